"""Every bad input a user can hand dpdiff, in one table: each must stop with ONE clear error (the right
exception type, a message that names the problem) before any work, and leave nothing in the output
folder. Cases that need a finished run (corrupt checkpoint, corrupt adapter) share one small run."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpdiff.errors import ConfigError, DataError, IntegrityError, PrivacyError
from dpdiff.training.arguments import add_finetune_arguments
from dpdiff.training.loop import finetune
from helpers import to_argv


def flags(base, out, **extra):
    values = {
        "pretrained_model_name_or_path": str(base), "output_dir": str(out), "dataset": "fashion_mnist",
        "max_train_samples": 32, "batch_size": 16, "physical_batch_size": 16, "max_steps": 4,
        "delta": 1e-3, "target_epsilon": 8.0, "num_inference_steps": 1, "checkpointing_steps": 0,
        "privacy_seed": 1, "ema_decay": 0,
    }
    values.update(extra)
    return add_finetune_arguments(argparse.ArgumentParser()).parse_args(to_argv(values))


def image_folder(root: Path, n_per_class: int = 4) -> Path:
    """Two classes of small grey images: a valid folder that each case then breaks one way."""
    rng = np.random.default_rng(0)
    for c in ("boots", "hats"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def metadata_folder(root: Path, labels: list, class_names: list | None) -> Path:
    root.mkdir(parents=True)
    lines = []
    for i, label in enumerate(labels):
        Image.new("L", (28, 28), color=i * 20).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "label": label}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    if class_names is not None:
        (root / "class_names.json").write_text(json.dumps(class_names))
    return root


# ---- the cases: build(tmp, base) -> (call, output_dir or None) ---------------------------------------


def _finetune_on_folder(tmp, base, folder: Path, **extra):
    out = tmp / "out"
    return lambda: finetune(flags(base, out, dataset=f"imagefolder:{folder}", max_train_samples=None,
                                  batch_size=4, physical_batch_size=4, **extra)), out


def corrupt_image(tmp, base):
    folder = image_folder(tmp / "data")
    (folder / "hats" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return _finetune_on_folder(tmp, base, folder)


def zero_byte_image(tmp, base):
    folder = image_folder(tmp / "data")
    (folder / "boots" / "0.png").write_bytes(b"")
    return _finetune_on_folder(tmp, base, folder)


def truncated_image(tmp, base):
    folder = image_folder(tmp / "data")
    path = folder / "boots" / "2.png"
    path.write_bytes(path.read_bytes()[:60])
    return _finetune_on_folder(tmp, base, folder)


def text_file_named_jpg(tmp, base):
    folder = image_folder(tmp / "data")
    (folder / "hats" / "notes.jpg").write_text("this is not an image\n")
    return _finetune_on_folder(tmp, base, folder)


def empty_dataset(tmp, base):
    (tmp / "data" / "boots").mkdir(parents=True)
    return _finetune_on_folder(tmp, base, tmp / "data")


def label_out_of_range(tmp, base):
    return _finetune_on_folder(tmp, base, metadata_folder(tmp / "data", [0, 1, 0, 5], ["boots", "hats"]))


def labels_without_names(tmp, base):
    return _finetune_on_folder(tmp, base, metadata_folder(tmp / "data", [0, 1, 0, 1], None))


def _finetune(**extra):
    def build(tmp, base):
        out = tmp / "out"
        return lambda: finetune(flags(base, out, **extra)), out
    return build


def batchnorm_in_trainable_path(tmp, base):
    from dpdiff.adapters import prepare_trainable
    from dpdiff.pipelines.preset import build_tiny_unet

    unet = build_tiny_unet()
    unet.conv_norm_out = torch.nn.BatchNorm2d(unet.conv_norm_out.num_channels)  # mixes examples of a batch
    return lambda: prepare_trainable(unet, "full"), None


def not_a_pipeline_folder(tmp, base):
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return _finetune(pretrained_model_name_or_path=str(folder))(tmp, base)


def pickle_weights(tmp, base):
    folder = tmp / "model"
    shutil.copytree(base, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return _finetune(pretrained_model_name_or_path=str(folder))(tmp, base)


def output_dir_under_a_file(tmp, base):
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    return lambda: finetune(flags(base, blocker / "sub")), blocker / "sub"


def non_empty_output_dir(tmp, base):
    out = tmp / "out"
    out.mkdir()
    (out / "old.txt").write_text("another run")
    return lambda: finetune(flags(base, out)), None


CASES = [
    # name, build, exception, message regex
    ("corrupt image", corrupt_image, DataError, r"cannot read image file .*hats/3\.png.*--skip_bad_files"),
    ("zero-byte image", zero_byte_image, DataError, r"boots/0\.png is empty \(0 bytes\)"),
    ("truncated image", truncated_image, DataError, r"cannot read image file .*boots/2\.png"),
    ("non-image file", text_file_named_jpg, DataError, r"cannot read image file .*notes\.jpg"),
    ("empty dataset", empty_dataset, DataError, r"holds no images"),
    ("label out of range", label_out_of_range, DataError, r"labels \[5\] have no class name"),
    ("labels without names", labels_without_names, DataError, r"integer labels but no class names.*class_names\.json"),
    ("delta >= 1/n", _finetune(delta=0.05), PrivacyError, r"delta=0\.05 >= 1/n=1/32"),
    ("epsilon zero", _finetune(target_epsilon=0), PrivacyError, r"target epsilon must be a finite number > 0"),
    ("epsilon negative", _finetune(target_epsilon=-1), PrivacyError, r"target epsilon must be a finite number > 0"),
    ("epsilon NaN", _finetune(target_epsilon="nan"), PrivacyError, r"target epsilon must be a finite number > 0, got nan"),
    ("epsilon absurdly small", _finetune(target_epsilon=1e-4, max_steps=400), PrivacyError, r"cannot be reached.*noise multiplier 1000"),
    ("physical > logical batch", _finetune(physical_batch_size=32), ConfigError, r"physical_batch_size 32 > --batch_size 16"),
    ("timestep bias multiplier 0", _finetune(timestep_bias_strategy="later", timestep_bias_multiplier=0), ConfigError,
     r"--timestep_bias_multiplier must be > 0, got 0"),
    ("timestep bias range reversed", _finetune(timestep_bias_strategy="range", timestep_bias_begin=900, timestep_bias_end=100),
     ConfigError, r"--timestep_bias_begin/end: the range \[900, 100\) must lie inside \[0, 1000\)"),
    ("prompt template unknown field", _finetune(prompt_template="a photo of {name}"), DataError, r"unknown field\(s\) \['name'\]"),
    ("LoRA target matches nothing", _finetune(lora_target_modules=["to_nothing"]), ConfigError, r"\['to_nothing'\] match no module"),
    ("BatchNorm in the trainable path", batchnorm_in_trainable_path, ConfigError, r"mix examples.*BatchNorm"),
    ("base model not a pipeline", not_a_pipeline_folder, ConfigError, r"not a diffusers pipeline folder \(no model_index\.json\)"),
    ("pickle weights", pickle_weights, ConfigError, r"unet has no \.safetensors weights"),
    ("unwritable output dir", output_dir_under_a_file, ConfigError, r"a_file/sub is not writable"),
    ("non-empty output dir", non_empty_output_dir, ConfigError, r"is not empty.*--overwrite_output_dir"),
]


@pytest.mark.parametrize("name,build,error,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_work(tiny_pipeline_dir, tmp_path, name, build, error, match):
    call, out = build(tmp_path, tiny_pipeline_dir)
    existed = out is not None and out.exists()
    with pytest.raises(error, match=match) as info:
        call()
    assert str(info.value).count("\n") <= 1  # one message, not a dump
    if out is not None and not existed:
        assert not out.exists(), f"{name}: left {out} behind ({sorted(os.listdir(out))})"
    if name == "non-empty output dir":
        assert sorted(os.listdir(tmp_path / "out")) == ["old.txt"]


def test_missing_hub_token_is_refused_before_any_work(tiny_pipeline_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"no Hugging Face token: pass --hub_token, set the HF_TOKEN"):
        finetune(flags(tiny_pipeline_dir, out, push_to_hub=True, hub_model_id="someone/private-run"))
    assert not out.exists()


def test_mixed_sizes_and_modes_are_converted_not_refused(tmp_path):
    from dpdiff.data import load_source
    from dpdiff.data.transforms import images_to_tensor

    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("L", (28, 28), 100).save(root / "a" / "grey.png")
    Image.new("RGBA", (40, 20), (10, 200, 30, 128)).save(root / "a" / "wide_rgba.png")
    Image.new("P", (17, 33)).save(root / "b" / "palette.gif")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(root / "b" / "big.jpg")
    source = load_source(f"imagefolder:{root}")
    assert len(source) == 4 and source.class_names == ["a", "b"]
    x = images_to_tensor(list(source.dataset["image"]), resolution=32, channels=3)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


@pytest.fixture(scope="module")
def finished_run(tiny_pipeline_dir, tmp_path_factory):
    """One small LoRA run with checkpoints 2 and 4 (5 steps)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    finetune(flags(tiny_pipeline_dir, out, max_steps=5, checkpointing_steps=2))
    return out


def test_corrupt_checkpoint_is_named_and_the_previous_one_still_loads(finished_run, tiny_pipeline_dir, tmp_path):
    from dpdiff.training.checkpoint import load_checkpoint, resolve_checkpoint

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    newest = run / "checkpoints" / "checkpoint-4" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:-50])
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    with pytest.raises(IntegrityError, match=r"checkpoint-4/state\.pt is missing, corrupt or truncated.*--resume_from_checkpoint \S*checkpoint-2"):
        finetune(flags(tiny_pipeline_dir, run, max_steps=5, resume_from_checkpoint="latest"))
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before  # nothing written
    trainable, state, ledger = load_checkpoint(resolve_checkpoint(run, str(run / "checkpoints" / "checkpoint-2")))
    assert state["step"] == 2 and trainable and ledger


def test_corrupt_adapter_is_named_by_dpdiff_sample(finished_run, tmp_path, capsys):
    from dpdiff.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    adapter = run / "pytorch_lora_weights.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    out = tmp_path / "samples"
    rc = main(["sample", "--model_dir", str(run), "--output_dir", str(out), "--num_per_class", "1", "--num_inference_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "pytorch_lora_weights.safetensors" in err, err[-2000:]
    assert not out.exists() or not any(out.iterdir())
