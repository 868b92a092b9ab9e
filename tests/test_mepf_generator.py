"""DP-MEPF generator: shapes, save/load, the matching loss falls, checkpoints resume, sampling."""

import json
import math

import pytest
import torch

from dpdiff.data import load_source
from dpdiff.data.transforms import images_to_tensor
from dpdiff.errors import ConfigError, IntegrityError
from dpdiff.mepf.embedding import EmbeddingConfig, build_extractor
from dpdiff.mepf.generator import ConditionalGenerator, GeneratorConfig, load_generator, save_generator, upsampling_plan
from dpdiff.mepf.release import release_embedding
from dpdiff.mepf.sample import sample_mepf
from dpdiff.mepf.release import EmbeddingTarget
from dpdiff.mepf.train import (
    TrainConfig,
    class_distances,
    class_moments,
    sample_variance_terms,
    train_generator,
)


@pytest.fixture(scope="module")
def setup():
    config = EmbeddingConfig(input_size=32, moments=2, labelled=True, layers=["stage2", "stage4", "stage6"])
    extractor = build_extractor(config)
    src = load_source("fashion_mnist", split="test", limit=400, seed=2)
    images = images_to_tensor(src.dataset["image"], resolution=28, channels=1)
    labels = torch.tensor(src.dataset["label"])
    # a large epsilon so the target is the data's embedding, not noise: this tests the optimiser
    release = release_embedding(extractor, images, labels, src.class_names, config, 200.0, 1e-3,
                                validation_fraction=0.2, progress=False)
    return config, extractor, release


def small_generator(release, seed=0):
    torch.manual_seed(seed)
    return ConditionalGenerator(GeneratorConfig(num_classes=10, resolution=28, channels=1, z_dim=16, base_channels=16,
                                                class_names=release.class_names))


def test_upsampling_plan_and_shapes():
    assert upsampling_plan(28) == (7, 2) and upsampling_plan(32) == (4, 3) and upsampling_plan(64) == (4, 4)
    with pytest.raises(ConfigError):
        upsampling_plan(27)
    for res, ch in ((28, 1), (32, 3)):
        g = ConditionalGenerator(GeneratorConfig(num_classes=3, resolution=res, channels=ch, z_dim=8, base_channels=8))
        x = g(torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]))
        assert x.shape == (5, ch, res, res) and x.abs().max() <= 1


def test_save_load_round_trips_exactly(setup, tmp_path):
    _, _, release = setup
    g = small_generator(release)
    g.train()
    g(torch.randn(20, 16), torch.arange(20) % 10)  # move the batch-norm statistics
    g.eval()
    save_generator(g, tmp_path / "gen")
    back = load_generator(tmp_path / "gen")
    assert back.config == g.config and not back.training
    for (k, v), (k2, v2) in zip(g.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    z, y = torch.randn(6, 16), torch.arange(6)
    assert torch.equal(g(z, y), back(z, y))
    with pytest.raises(IntegrityError):
        load_generator(tmp_path / "missing")


def test_matching_loss_falls_and_best_checkpoint_is_saved(setup, tmp_path):
    _, extractor, release = setup
    g = small_generator(release)
    cfg = TrainConfig(steps=30, batch_size=10, learning_rate=2e-3, eval_every=15, eval_samples_per_class=2, seed=0)
    result = train_generator(release, extractor, g, cfg, tmp_path, progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert result.selected_by == "validation" and result.eval_steps == [15, 30]
    assert result.best_score == min(result.eval_scores)
    assert len(result.eval_class_scores) == 2 and all(len(row) == 10 for row in result.eval_class_scores)
    for score, row in zip(result.eval_scores, result.eval_class_scores):  # the score is the class-weighted sum
        assert math.isclose(score, sum(w * d for w, d in zip(release.target("validation").class_weights.tolist(), row)), rel_tol=1e-5)
    assert (tmp_path / "generator" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoint" / "state.safetensors").is_file()

    # resume continues from the checkpoint and ends where an uninterrupted run ends
    g2 = small_generator(release)
    short = TrainConfig(steps=15, batch_size=10, learning_rate=2e-3, eval_every=15, eval_samples_per_class=2, seed=0)
    train_generator(release, extractor, g2, short, tmp_path / "resumed", progress=False)
    g3 = small_generator(release, seed=99)
    resumed = train_generator(release, extractor, g3, cfg, tmp_path / "resumed", resume=True, progress=False)
    assert len(resumed.losses) == 30
    torch.testing.assert_close(torch.tensor(resumed.losses[15:]), torch.tensor(result.losses[15:]), rtol=1e-4, atol=1e-6)

    # a resume with another learning rate uses it (a step decay), not the checkpoint's: other losses from step 15
    g4 = small_generator(release)  # the same first 15 steps as the resumed run above
    train_generator(release, extractor, g4, short, tmp_path / "decayed", progress=False)
    g5 = small_generator(release, seed=97)
    decayed_cfg = TrainConfig(steps=30, batch_size=10, learning_rate=2e-4, eval_every=15, eval_samples_per_class=2, seed=0)
    decayed = train_generator(release, extractor, g5, decayed_cfg, tmp_path / "decayed", resume=True, progress=False)
    assert decayed.losses[:16] == resumed.losses[:16] and decayed.losses[16:] != resumed.losses[16:]


def test_step_schedule_decays_once_at_its_fraction_and_a_resume_continues_it(setup, tmp_path):
    cfg = TrainConfig(steps=30, batch_size=10, learning_rate=2e-3, lr_schedule="step", lr_decay_at=0.5, lr_decay_factor=0.1,
                      eval_every=15, eval_samples_per_class=2, seed=0)
    assert [cfg.learning_rate_at(s) for s in (0, 14, 15, 29)] == [2e-3, 2e-3, 2e-3 * 0.1, 2e-3 * 0.1]
    for bad in ({"lr_decay_at": 1.0}, {"lr_decay_at": 0.0}, {"lr_decay_factor": 0.0}, {"lr_decay_factor": 1.5}):
        with pytest.raises(ConfigError, match="lr_decay"):
            TrainConfig(lr_schedule="step", **bad)
    _, extractor, release = setup
    # the first 15 steps (before the decay) under a constant rate, then resumed under the step schedule
    short = TrainConfig(steps=15, batch_size=10, learning_rate=2e-3, eval_every=15, eval_samples_per_class=2, seed=0)
    train_generator(release, extractor, small_generator(release), short, tmp_path / "resumed", progress=False)
    resumed = train_generator(release, extractor, small_generator(release, seed=98), cfg, tmp_path / "resumed", resume=True, progress=False)
    whole = train_generator(release, extractor, small_generator(release), cfg, tmp_path / "whole", progress=False)
    assert resumed.losses == whole.losses  # one run with the schedule == constant part + resumed decayed part
    state = json.loads((tmp_path / "whole" / "checkpoint" / "trainer_state.json").read_text())
    assert state["param_groups"][0]["lr"] == 2e-3 * 0.1


def test_cosine_schedule_decays_to_zero_and_continues_after_a_resume(setup, tmp_path):
    cfg = TrainConfig(steps=30, batch_size=10, learning_rate=2e-3, lr_schedule="cosine", eval_every=15, eval_samples_per_class=2, seed=0)
    assert cfg.learning_rate_at(0) == 2e-3 and math.isclose(cfg.learning_rate_at(15), 1e-3) and cfg.learning_rate_at(29) < 2e-5
    assert TrainConfig(learning_rate=2e-3).learning_rate_at(1999) == 2e-3  # constant is the default
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
    _, extractor, release = setup
    train_generator(release, extractor, small_generator(release), cfg, tmp_path / "cosine", progress=False)
    last = json.loads((tmp_path / "cosine" / "checkpoint" / "trainer_state.json").read_text())
    assert last["param_groups"][0]["lr"] == cfg.learning_rate_at(29)  # the rate the last step ran at

    # a constant run's checkpoint resumed under the cosine schedule runs at the schedule's rate of the absolute step
    short = TrainConfig(steps=15, batch_size=10, learning_rate=2e-3, eval_every=15, eval_samples_per_class=2, seed=0)
    train_generator(release, extractor, small_generator(release), short, tmp_path / "resumed", progress=False)
    resumed = train_generator(release, extractor, small_generator(release, seed=98), cfg, tmp_path / "resumed", resume=True, progress=False)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["param_groups"][0]["lr"] == cfg.learning_rate_at(29)
    assert len(resumed.losses) == 30


def test_sample_mepf_returns_the_dataset_format(setup, tmp_path):
    _, _, release = setup
    g = small_generator(release).eval()
    save_generator(g, tmp_path / "generator")
    images, labels, names = sample_mepf(tmp_path, num_per_class=3, seed=5)
    assert len(images) == 30 and labels == [c for c in range(10) for _ in range(3)]
    assert names == release.class_names
    assert images[0].size == (28, 28) and images[0].mode == "L"
    again, _, _ = sample_mepf(tmp_path / "generator", num_per_class=3, seed=5)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    with pytest.raises(ConfigError):
        sample_mepf(tmp_path, num_per_class=0)


def test_training_refuses_a_batch_smaller_than_the_classes(setup):
    _, extractor, release = setup
    with pytest.raises(ConfigError, match="batch_size"):
        train_generator(release, extractor, small_generator(release), TrainConfig(steps=1, batch_size=5), progress=False)


def test_training_refuses_an_extractor_whose_features_are_not_the_releases(setup, tmp_path):
    """A release matched against other layers would train on a loss between unrelated features; one clear error
    before any step, and nothing written."""
    _, _, release = setup
    other = build_extractor(EmbeddingConfig(input_size=32, moments=2, labelled=True, layers=["stage1", "stage2", "stage4", "stage6"]))
    with pytest.raises(ConfigError, match="release's embedding has .* features per class but efficientnet_lite0 with layers stage1"):
        train_generator(release, other, small_generator(release), TrainConfig(steps=2, batch_size=20), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("moments", [1, 2])
def test_selection_score_removes_the_finite_sample_term_so_it_is_unbiased(moments):
    """n samples' moments overstate the squared distance by tr(Cov)/n; the score subtracts its unbiased estimate.
    Checked on draws with known moments: averaged over many draws the corrected distance is the true one,
    the raw one is the true one plus tr(Cov)/n (so a generator with less variety would score better)."""
    torch.manual_seed(0)
    k, n, dim, draws = 3, 5, 4, 4000
    mu = torch.randn(k, dim, dtype=torch.float64)
    scale = torch.rand(k, dim, dtype=torch.float64) + 0.5
    target = EmbeddingTarget(mean1=torch.zeros(k, dim, dtype=torch.float64),
                             mean2=torch.ones(k, dim, dtype=torch.float64) if moments == 2 else None,
                             class_weights=torch.full((k,), 1 / k, dtype=torch.float64))
    labels = torch.arange(k).repeat_interleave(n)
    raw, corrected = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for _ in range(draws):
        phi = mu[labels] + scale[labels] * torch.randn(k * n, dim, dtype=torch.float64)
        mean1, mean2, _ = class_moments(phi, labels, k, moments)
        d = class_distances(target, mean1, mean2)
        raw += d / draws
        corrected += (d - sample_variance_terms(phi, n, moments)) / draws
    true = mu.pow(2).sum(1)  # ||E phi - 0||^2
    excess = scale.pow(2).sum(1) / n  # tr(Cov phi) / n
    if moments == 2:
        second = mu.pow(2) + scale.pow(2)  # E phi^2
        true = true + (second - 1).pow(2).sum(1)
        var_sq = 4 * mu.pow(2) * scale.pow(2) + 2 * scale.pow(4)  # Var(phi^2) for a Gaussian
        excess = excess + var_sq.sum(1) / n
    torch.testing.assert_close(corrected, true, rtol=0.05, atol=0.05)
    torch.testing.assert_close(raw, true + excess, rtol=0.05, atol=0.05)
    assert (raw - corrected).min() > 0.5 * excess.min()  # the term removed is not negligible at n = 5


def test_selection_needs_two_samples_per_class():
    with pytest.raises(ConfigError, match="eval_samples_per_class must be >= 2"):
        TrainConfig(eval_samples_per_class=1)


def test_a_checkpoint_scored_before_the_correction_is_not_compared_with_corrected_scores(setup, tmp_path):
    """Old checkpoints hold scores with the finite-sample term in (larger, and not comparable): after a resume the
    first corrected evaluation replaces their best instead of being judged against it."""
    _, extractor, release = setup
    cfg = TrainConfig(steps=15, batch_size=10, eval_every=15, eval_samples_per_class=2, seed=0)
    train_generator(release, extractor, small_generator(release), cfg, tmp_path, progress=False)
    state_file = tmp_path / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["result"]["eval_class_scores"]
    state["result"]["best_score"] = state["result"]["eval_scores"][0] = -1.0  # unbeatable on the new scale
    state_file.write_text(json.dumps(state))
    before = (tmp_path / "generator" / "model.safetensors").read_bytes()
    longer = TrainConfig(steps=30, batch_size=10, eval_every=15, eval_samples_per_class=2, seed=0)
    resumed = train_generator(release, extractor, small_generator(release, seed=3), longer, tmp_path, resume=True, progress=False)
    assert resumed.best_step == 30 and resumed.best_score == resumed.eval_scores[1] > -1.0
    assert (tmp_path / "generator" / "model.safetensors").read_bytes() != before
    assert len(resumed.eval_class_scores) == 2 and resumed.eval_class_scores[0] == [] and len(resumed.eval_class_scores[1]) == 10
