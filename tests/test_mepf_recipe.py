"""`dpdiff mepf` / recipes/train_mepf.py end to end on a tiny Fashion-MNIST subset."""

import json
import runpy
from pathlib import Path

import pytest
import yaml

from dpdiff.cli import main as dpdiff_main
from dpdiff.io import sha256_file
from dpdiff.mepf.sample import sample_mepf
from dpdiff.sampling.records import read_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["--limit", "200", "--delta", "1e-3", "--feature_input_size", "32", "--feature_layers", "stage2", "stage4",
        "--generator_steps", "4", "--batch_size", "10", "--eval_every", "2", "--eval_samples_per_class", "2",
        "--z_dim", "8", "--base_channels", "8", "--grid_per_class", "2", "--no-progress"]


def run_recipe(argv):
    """recipes/train_mepf.py as a user runs it (its main, in this process)."""
    module = runpy.run_path(str(REPO / "recipes" / "train_mepf.py"), run_name="recipe")
    return module["main"](argv)


def test_recipe_end_to_end_leaves_every_file(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "mepf.yaml"
    config.write_text(yaml.safe_dump({"target_epsilon": 4.0, "moments": 2, "validation_fraction": 0.2, "seed": 3}))
    assert run_recipe(["--config", str(config), "--output_dir", str(out), "--target_epsilon", "5.0", *TINY]) == 0
    for name in ("privacy.json", "release.safetensors", "generator/model.safetensors", "generator/config.json",
                 "checkpoint/state.safetensors", "generation_config.json", "mepf_config.json", "samples.png"):
        assert (out / name).is_file(), name
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["target_epsilon"] == 5.0  # the command line beats the YAML
    assert privacy["epsilon"] <= 5.0 and privacy["method"] == "mepf"
    assert len(privacy["releases"]) == 6  # sum1, sum2, counts, and the same for validation (YAML keys applied)
    flags = json.loads((out / "mepf_config.json").read_text())["flags"]
    assert flags["seed"] == 3 and flags["moments"] == 2
    # the sampling module's reader accepts the folder, and sample_mepf works on it
    assert read_run(out).method == "mepf"
    images, labels, names = sample_mepf(out, num_per_class=1, seed=0)
    assert len(images) == 10 and names[1] == "Trouser"

    # a second run into the same folder would release again: refused before any work
    before = sha256_file(out / "release.safetensors")
    assert dpdiff_main(["mepf", "--output_dir", str(out), *TINY]) == 2
    # --resume reuses the release (no new privacy cost) and trains further
    assert dpdiff_main(["mepf", "--output_dir", str(out), "--resume", *TINY, "--generator_steps", "6"]) == 0  # last flag wins
    assert sha256_file(out / "release.safetensors") == before
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 6


@pytest.mark.parametrize("bad, message", [
    (["--delta", "0.01"], "1/n"),
    (["--target_epsilon", "0"], "epsilon"),
    (["--max_grad_norm", "-1"], "max_grad_norm"),
    (["--feature_extractor", "vgg19"], "torchvision"),
    (["--resolution", "27"], "resolution"),
    (["--validation_fraction", "1.5"], "validation_fraction"),
    (["--lr_schedule", "step", "--lr_decay_at", "1"], "lr_decay_at"),
    (["--feature_layers", "stage9"], "stage9"),
    (["--eval_samples_per_class", "1"], "eval_samples_per_class"),
])
def test_bad_input_is_one_clear_error_before_any_work(tmp_path, capsys, bad, message):
    out = tmp_path / "run"
    argv = ["mepf", "--output_dir", str(out), *TINY, *bad]
    if bad[0] == "--feature_extractor":
        try:
            import torchvision.models  # noqa: F401
            pytest.skip("torchvision works here")
        except Exception:
            pass
    assert dpdiff_main(argv) == 2
    err = capsys.readouterr().err
    assert "dpdiff mepf: error:" in err and message in err
    assert not (out / "release.safetensors").exists()


@pytest.mark.parametrize("bad", [["--feature_layers", "stage9"], ["--feature_layers", "stage2", "stage2"], ["--eval_samples_per_class", "1"]])
def test_input_that_needs_no_data_is_checked_before_the_data_is_read(tmp_path, capsys, monkeypatch, bad):
    import dpdiff.data

    def no_data(*args, **kwargs):
        raise AssertionError("the private data was read before the flags were checked")

    monkeypatch.setattr(dpdiff.data, "load_source", no_data)
    assert dpdiff_main(["mepf", "--output_dir", str(tmp_path / "run"), *TINY, *bad]) == 2
    assert "dpdiff mepf: error:" in capsys.readouterr().err


def test_pixel_features_are_released_and_matched_by_default(tmp_path):
    from dpdiff.mepf.release import load_release

    assert dpdiff_main(["mepf", "--output_dir", str(tmp_path / "plain"), *TINY, "--no-pixel_features"]) == 0
    assert dpdiff_main(["mepf", "--output_dir", str(tmp_path / "pixels"), *TINY]) == 0
    plain, pixels = load_release(tmp_path / "plain"), load_release(tmp_path / "pixels")
    assert pixels.config.pixels and not plain.config.pixels
    assert pixels.target().mean1.shape[1] == plain.target().mean1.shape[1] + 28 * 28  # the grey levels: one more block
    assert (tmp_path / "pixels" / "generator" / "model.safetensors").is_file()


def test_shipped_config_parses():
    from dpdiff.config import load_config, validate_config
    import argparse

    from dpdiff.mepf.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    values = validate_config(parser, load_config(REPO / "recipes" / "configs" / "mepf.yaml"))
    assert values["dataset"] == "fashion_mnist" and values["delta"] == 1e-5
