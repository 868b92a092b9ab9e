"""Several DP-MEPF generators on one release: each trains from its own seed, the best by the corrected
score on a fresh sample is kept, and a resume continues every candidate. Post-processing: the release is
reused, never redrawn."""

import json

import pytest
import torch

from dpdiff.cli import main as dpdiff_main
from dpdiff.data import load_source
from dpdiff.data.transforms import images_to_tensor
from dpdiff.errors import ConfigError
from dpdiff.io import sha256_file
from dpdiff.mepf.embedding import EmbeddingConfig, build_extractor
from dpdiff.mepf.generator import ConditionalGenerator, GeneratorConfig, load_generator
from dpdiff.mepf.release import release_embedding
from dpdiff.mepf.restarts import SELECTION_SEED, train_best_of
from dpdiff.mepf.train import TrainConfig, score_generator
from test_mepf_recipe import TINY


@pytest.fixture(scope="module")
def setup():
    config = EmbeddingConfig(input_size=32, moments=2, labelled=True, layers=["stage2", "stage4"])
    extractor = build_extractor(config)
    src = load_source("fashion_mnist", split="test", limit=300, seed=4)
    images = images_to_tensor(src.dataset["image"], resolution=28, channels=1)
    release = release_embedding(extractor, images, torch.tensor(src.dataset["label"]), src.class_names, config, 200.0, 1e-3,
                                progress=False)
    return extractor, release


def make_model(release):
    return lambda: ConditionalGenerator(GeneratorConfig(num_classes=10, resolution=28, channels=1, z_dim=8, base_channels=8,
                                                        class_names=release.class_names))


def test_each_candidate_has_its_own_seed_and_the_lowest_score_is_kept(setup, tmp_path):
    extractor, release = setup
    config = TrainConfig(steps=6, batch_size=20, eval_every=3, eval_samples_per_class=2, seed=5)
    best, candidates = train_best_of(release, extractor, make_model(release), config, 3, tmp_path, select_samples_per_class=4,
                                     progress=False)
    assert [c.seed for c in candidates] == [5, 6, 7]
    first = [load_generator(tmp_path / "candidates" / f"seed{s}" / "generator").state_dict()["project.weight"] for s in (5, 6, 7)]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])  # other seeds: other generators
    assert best.score == min(c.score for c in candidates) and len(best.class_scores) == 10
    for name in ("model.safetensors", "config.json"):  # the kept generator is the best candidate's, byte for byte
        assert sha256_file(tmp_path / "generator" / name) == sha256_file(tmp_path / "candidates" / f"seed{best.seed}" / "generator" / name)
    # the choice's score is reproducible from the files alone
    again, _ = score_generator(load_generator(tmp_path / "generator"), extractor, release, release.target("train"), 4, seed=SELECTION_SEED)
    assert again == pytest.approx(best.score, rel=1e-5)

    # a resume trains no step twice and keeps the same generator
    again_best, again_all = train_best_of(release, extractor, make_model(release), config, 3, tmp_path, select_samples_per_class=4,
                                          resume=True, progress=False)
    assert again_best.seed == best.seed and [len(c.result.losses) for c in again_all] == [6, 6, 6]
    with pytest.raises(ConfigError, match="select_samples_per_class"):
        train_best_of(release, extractor, make_model(release), config, 2, tmp_path / "x", select_samples_per_class=1, progress=False)


def test_dpdiff_mepf_num_generators_records_every_candidate(tmp_path):
    out = tmp_path / "run"
    assert dpdiff_main(["mepf", "--output_dir", str(out), *TINY, "--num_generators", "2", "--select_samples_per_class", "3"]) == 0
    record = json.loads((out / "mepf_config.json").read_text())
    candidates = record["candidates"]
    assert [c["seed"] for c in candidates] == [0, 1] and sum(c["kept"] for c in candidates) == 1
    kept = next(c for c in candidates if c["kept"])
    assert kept["score"] == min(c["score"] for c in candidates)
    assert sha256_file(out / "generator" / "model.safetensors") == sha256_file(out / "candidates" / f"seed{kept['seed']}" / "generator" / "model.safetensors")
    assert (out / "samples.png").is_file()
    privacy = json.loads((out / "privacy.json").read_text())
    assert [r["name"] for r in privacy["releases"]] == ["sum1", "counts"] and privacy["epsilon"] <= 10  # one release for all
    assert dpdiff_main(["mepf", "--output_dir", str(tmp_path / "bad"), *TINY, "--num_generators", "0"]) == 2
