"""The private step of DP-MEPF: per-example bound, sensitivity, noise level, noisy counts, save/load.

Real pretrained EfficientNet-Lite0 on real Fashion-MNIST images (small input size for speed)."""

import math

import pytest
import torch

from dpdiff.data import load_source
from dpdiff.data.transforms import images_to_tensor
from dpdiff.errors import DataError, IntegrityError, PrivacyError
from dpdiff.mepf.calibration import epsilon_for_releases, noise_multiplier_for_releases
from dpdiff.mepf.embedding import EmbeddingConfig, EmbeddingSums, build_extractor, embed, embedding_rows, embedding_sums
from dpdiff.mepf.release import add_noise, load_release, planned_releases, release_embedding, save_release, validation_mask

C = 2.5  # a non-unit bound so a forgotten factor of C shows


@pytest.fixture(scope="module", params=[False, True], ids=["features", "features+pixels"])
def config(request):
    return EmbeddingConfig(input_size=32, max_norm=C, moments=2, labelled=True, pixels=request.param)


@pytest.fixture(scope="module")
def extractor(config):
    return build_extractor(config, batch_size=32)


@pytest.fixture(scope="module")
def data():
    src = load_source("fashion_mnist", split="test", limit=60, seed=1)
    images = images_to_tensor(src.dataset["image"], resolution=28, channels=1)
    return images, torch.tensor(src.dataset["label"]), src.class_names


def test_each_example_has_norm_at_most_C_and_contributes_at_most_C_over_n(extractor, config, data):
    images, _, _ = data
    phi = embed(extractor, images, config)
    norms = phi.norm(dim=1)
    assert (norms <= C * (1 + 1e-6)).all()
    assert norms.min() > 0.9 * C  # blocks are rescaled to the bound, not merely below it
    n = len(images)
    mean = phi.mean(0)
    for i in range(n):
        assert (phi[i] / n).norm() <= C / n * (1 + 1e-6)
    # a wildly scaled input cannot escape the bound
    assert (embed(extractor, images[:4] * 1e3, config).norm(dim=1) <= C * (1 + 1e-6)).all()
    assert mean.shape == (phi.shape[1],)


def test_adding_or_replacing_one_example_moves_the_sums_by_at_most_the_sensitivity(extractor, config, data):
    images, labels, names = data
    full = embedding_sums(extractor, images, labels, len(names), config, progress=False)
    # add/remove-one (the relation we account for): sum1 by <= C, sum2 by <= C^2, counts by 1
    for i in (0, 17, 59):
        keep = torch.tensor([j for j in range(len(images)) if j != i])
        less = embedding_sums(extractor, images[keep], labels[keep], len(names), config, progress=False)
        assert (full.sum1 - less.sum1).norm() <= C * (1 + 1e-9)
        assert (full.sum2 - less.sum2).norm() <= C ** 2 * (1 + 1e-9)
        assert (full.counts - less.counts).norm() == 1.0
        changed_rows = ((full.sum1 - less.sum1).abs().sum(1) > 0).sum()
        assert changed_rows == 1
    # replace-one with n public (not our relation; stated for comparison): the mean moves by <= 2C/n
    n = len(images)
    swapped = images.clone()
    swapped[5] = -images[5]
    other = embedding_sums(extractor, swapped, labels, len(names), config, progress=False)
    assert ((full.sum1 - other.sum1).sum(0) / n).norm() <= 2 * C / n * (1 + 1e-9)


def test_noise_std_matches_calibrated_sigma_for_every_release():
    config = EmbeddingConfig(max_norm=C, moments=2)
    releases = planned_releases(config, with_validation=False)
    sigma = noise_multiplier_for_releases(releases, 3.0, 1e-5)
    exact = EmbeddingSums(sum1=torch.zeros(10, 200, dtype=torch.float64), sum2=torch.ones(10, 200, dtype=torch.float64),
                          counts=torch.arange(10, dtype=torch.float64))
    rng = torch.Generator().manual_seed(0)
    draws = [add_noise(exact, releases, sigma, rng) for _ in range(200)]
    for key, sensitivity, value in (("sum1", C, exact.sum1), ("sum2", C ** 2, exact.sum2), ("counts", 1.0, exact.counts)):
        noise = torch.stack([d[key] - value for d in draws])
        expected = sigma * sensitivity
        # 400k (sums) / 2k (counts) samples: the std is within a few percent
        assert noise.std().item() == pytest.approx(expected, rel=0.01 if key != "counts" else 0.05), key
        assert abs(noise.mean().item()) < 0.1 * expected
    # draws are independent across releases and repetitions
    assert not torch.equal(draws[0]["sum1"], draws[1]["sum1"])


def test_labelled_release_has_noisy_counts_inside_the_budget(extractor, config, data, tmp_path):
    images, labels, names = data
    release = release_embedding(extractor, images, labels, names, config, target_epsilon=5.0, delta=1e-3, progress=False)
    exact = torch.bincount(labels, minlength=len(names)).double()
    counts = release.tensors["counts"]
    assert counts.shape == (10,)
    assert not torch.equal(counts, exact) and (counts != counts.round()).all()
    p = release.privacy
    assert [r["name"] for r in p["releases"]] == ["sum1", "sum2", "counts"]
    assert p["sensitivity"] == {"sum1": C, "sum2": C ** 2, "counts": 1.0}
    assert p["neighbouring_relation"] == "add_or_remove_one" and p["accountant"] == "analytic_gaussian"
    assert p["max_grad_norm"] == C and p["method"] == "mepf" and p["noise_source"] == "os_entropy"
    # sigma covers all three releases: more than a lone mean would need, and exactly on target
    sigma = p["noise_multiplier"]
    releases = planned_releases(config, with_validation=False)
    assert sigma == pytest.approx(noise_multiplier_for_releases(releases, 5.0, 1e-3))
    assert sigma > noise_multiplier_for_releases(releases[:1], 5.0, 1e-3) * 1.5
    assert p["epsilon"] == pytest.approx(epsilon_for_releases(releases, sigma, 1e-3)) and p["epsilon"] <= 5.0
    assert math.isclose(p["num_examples"], float(counts.sum()), abs_tol=0.06)
    # the released values are the exact sums plus noise of the stated std (one draw: loose check)
    exact_sums = embedding_sums(extractor, images, labels, len(names), config, progress=False)
    resid = (release.tensors["sum1"] - exact_sums.sum1) / (sigma * C)
    assert 0.8 < resid.std().item() < 1.2

    save_release(release, tmp_path)
    back = load_release(tmp_path)
    assert back.privacy == release.privacy and back.class_names == names
    assert back.config == release.config and (back.resolution, back.channels) == (28, 1)
    for k, v in release.tensors.items():
        assert torch.equal(back.tensors[k], v) and back.tensors[k].dtype == torch.float64
    t = back.target()
    assert t.mean1.shape == (10, exact_sums.sum1.shape[1]) and t.class_weights.sum().item() == pytest.approx(1.0)


def test_unlabelled_release_and_fixed_seed_is_marked_not_private(extractor, data):
    images, labels, _ = data
    config = EmbeddingConfig(input_size=32, labelled=False)
    a = release_embedding(extractor, images, None, ["image"], config, 2.0, 1e-3, noise_seed=7, progress=False)
    b = release_embedding(extractor, images, None, ["image"], config, 2.0, 1e-3, noise_seed=7, progress=False)
    c = release_embedding(extractor, images, None, ["image"], config, 2.0, 1e-3, progress=False)
    assert a.tensors["sum1"].shape[0] == 1 and torch.equal(a.tensors["sum1"], b.tensors["sum1"])
    assert not torch.equal(a.tensors["sum1"], c.tensors["sum1"])
    assert "NOT private" in a.privacy["noise_source"]


def test_validation_split_is_per_example_and_budgeted(extractor, config, data):
    images, labels, names = data
    mask = validation_mask(images, labels, 0.3, salt=0)
    # adding an example does not move any other example between the parts
    extra = torch.rand(1, 1, 28, 28) * 2 - 1
    grown = validation_mask(torch.cat([extra, images]), torch.cat([torch.tensor([3]), labels]), 0.3, salt=0)
    assert torch.equal(grown[1:], mask)
    assert 5 <= mask.sum() <= 35
    release = release_embedding(extractor, images, labels, names, config, 5.0, 1e-3, validation_fraction=0.3, progress=False)
    assert release.has_validation
    assert len(release.privacy["releases"]) == 6
    assert release.tensors["val_counts"].sum().item() == pytest.approx(mask.sum().item(), abs=20)
    # an empty part is still released (noise only, same shape): the output's form never depends on the data
    tiny = release_embedding(extractor, images, labels, names, config, 5.0, 1e-3, validation_fraction=1e-12, progress=False)
    assert validation_mask(images, labels, 1e-12).sum() == 0
    assert tiny.tensors["val_sum1"].shape == tiny.tensors["sum1"].shape
    assert tiny.tensors["val_sum1"].abs().max() > 0 and tiny.tensors["val_counts"].abs().max() > 0


def test_bad_requests_are_refused_before_any_work(extractor, config, data, tmp_path):
    images, labels, names = data
    with pytest.raises(PrivacyError, match="1/n"):
        release_embedding(extractor, images, labels, names, config, 1.0, 0.05, progress=False)
    with pytest.raises(DataError, match="labels"):
        release_embedding(extractor, images, labels + 10, names, config, 1.0, 1e-3, progress=False)
    with pytest.raises(PrivacyError):
        release_embedding(extractor, images, labels, names, config, -1.0, 1e-3, progress=False)
    with pytest.raises(IntegrityError):
        load_release("/nonexistent/release")
    (tmp_path / "release.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(IntegrityError, match="not a readable"):
        load_release(tmp_path)


def test_a_release_names_its_layers_and_an_old_default_release_keeps_its_meaning(extractor, config, data, tmp_path):
    """The default layers may change between versions (EfficientNet-Lite0 gained stage1 on 2026-12-06): a release
    states the layers its sums were computed on, and one saved as "the default" before then loads with that default."""
    from dataclasses import replace

    from dpdiff.features import EFFICIENTNET_LITE0_DEFAULT_LAYERS, EFFICIENTNET_LITE0_LEGACY_DEFAULT_LAYERS

    images, labels, names = data
    assert config.layers is None
    release = release_embedding(extractor, images, labels, names, config, target_epsilon=5.0, delta=1e-3, progress=False)
    assert release.config.layers == list(EFFICIENTNET_LITE0_DEFAULT_LAYERS) == extractor.layer_names
    save_release(release, tmp_path / "new")
    assert load_release(tmp_path / "new").config.layers == list(EFFICIENTNET_LITE0_DEFAULT_LAYERS)
    # an old release: the same file with layers=None, and stage2..7's 2304 features (stage1 adds 2 x 16)
    old = replace(release, config=replace(release.config, layers=None))
    save_release(old, tmp_path / "old")
    back = load_release(tmp_path / "old")
    assert back.config.layers == list(EFFICIENTNET_LITE0_LEGACY_DEFAULT_LAYERS)
    assert build_extractor(back.config).layer_names == ["stage2", "stage3", "stage4", "stage5", "stage6", "stage7"]


def test_the_pixel_block_is_the_image_rescaled_like_every_block_and_sums_line_up_batch_by_batch(data):
    """The pixel block is the grey levels in [0, 1], scaled to C / sqrt(B) like the other blocks; embedding_sums
    pairs each extractor batch with its own images (a misaligned slice would pass the norm bound and be wrong)."""
    images, labels, names = data
    with_pixels = EmbeddingConfig(input_size=32, max_norm=C, moments=2, labelled=True, pixels=True)
    extractor = build_extractor(with_pixels, batch_size=16)
    phi = embed(extractor, images, with_pixels)
    without = embed(extractor, images, EmbeddingConfig(input_size=32, max_norm=C, moments=2, labelled=True))
    pixel_dim = images[0].numel()
    assert phi.shape[1] == without.shape[1] + pixel_dim
    pixel_block = phi[:, :pixel_dim]
    grey = (images.flatten(1) + 1) / 2
    num_blocks = round((C / pixel_block.norm(dim=1)).pow(2).mean().item())
    torch.testing.assert_close(pixel_block, grey / grey.norm(dim=1, keepdim=True) * C / math.sqrt(num_blocks))
    # the other blocks are the feature blocks, each shrunk from C / sqrt(B - 1) to C / sqrt(B)
    torch.testing.assert_close(phi[:, pixel_dim:], without * math.sqrt((num_blocks - 1) / num_blocks), rtol=1e-5, atol=1e-7)
    assert (phi.norm(dim=1) <= C * (1 + 1e-6)).all()
    sums = embedding_sums(extractor, images, labels, len(names), with_pixels, batch_size=16, progress=False)
    expected = torch.zeros(len(names), phi.shape[1], dtype=torch.float64).index_add_(0, labels, phi.double())
    torch.testing.assert_close(sums.sum1, expected, rtol=1e-5, atol=1e-6)


def test_an_example_embeds_to_the_same_bits_alone_and_beside_any_batch_mates(extractor, config, data):
    """phi(x) must be a function of x alone: a short last batch (or another memory layout) takes other CPU
    kernels and rounds x's features differently with the number of its batch-mates. Every batch has one shape."""
    images, _, _ = data
    x = images[:1]
    alone = torch.cat(list(embedding_rows(extractor, x, config, batch_size=8, progress=False)))
    for mates in (1, 4, 12):  # full batch of 8 with it, a short batch, x in the second (short) batch
        beside = torch.cat([images[10:10 + mates], x]) if mates == 12 else torch.cat([x, images[10:10 + mates]])
        if mates == 4:
            beside = beside.to(memory_format=torch.channels_last)
        rows = torch.cat(list(embedding_rows(extractor, beside, config, batch_size=8, progress=False)))
        row = rows[-1:] if mates == 12 else rows[:1]
        assert torch.equal(row, alone), f"x's features moved with {mates} batch-mates"


def test_a_set_decoded_on_read_gives_the_same_split_and_sums_as_the_whole_tensor(extractor, config):
    """`dpdiff mepf` and tune's score release read the private images a batch at a time (memory flat in N): the
    per-example split and the exact sums are those of the images decoded up front."""
    from dpdiff.data.image_sets import ImageColumn, ImageTensors

    src = load_source("fashion_mnist", split="test", limit=40, seed=3)
    whole = images_to_tensor(src.dataset["image"], resolution=28, channels=1)
    lazy = ImageTensors(ImageColumn(src.dataset), 28, 1)
    labels = torch.tensor(src.dataset["label"])
    assert torch.equal(validation_mask(lazy, labels, 0.3, salt=5), validation_mask(whole, labels, 0.3, salt=5))
    index = torch.arange(3, 40, 2)
    a = embedding_sums(extractor, lazy[index], labels[index], 10, config, batch_size=8, progress=False)
    b = embedding_sums(extractor, whole[index], labels[index], 10, config, batch_size=8, progress=False)
    assert torch.equal(a.sum1, b.sum1) and torch.equal(a.counts, b.counts)
