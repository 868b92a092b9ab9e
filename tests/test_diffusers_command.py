"""A diffusers user's command, with diffusers' flag names, trains as written (issue 40): the recipe runs on a
captions-only folder, the grid, generation_config.json and the model card use --validation_prompt, and no
private caption, nor a prompt training never saw, reaches a released file."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml
from PIL import Image

from dpdiff.data import load_source
from dpdiff.training import diffusers_run, outputs
from dpdiff.training.arguments import add_finetune_arguments
from dpdiff.training.loop import check_arguments

CAPTION = "secret caption of person {i}"


def _captioned_folder(root, n=8):
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (16, 16), (30 * i, 255 - 30 * i, 40)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": CAPTION.format(i=i)})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _args(argv):
    return check_arguments(add_finetune_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_the_diffusers_command_trains_with_its_validation_prompt(tiny_pipeline_dir, tmp_path, capsys):
    from dpdiff.training.cli import recipe_main

    data, out, hf = _captioned_folder(tmp_path / "data"), tmp_path / "run", tmp_path / "hf"
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(data),
            "--caption_column", "text", "--resolution", "16", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--max_train_steps", "2", "--mixed_precision", "no", "--validation_prompt", "a red chair", "a blue cup",
            "--num_validation_images", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--snr_gamma", "5",
            "--noise_offset", "0.05", "--cache_dir", str(hf), "--dataloader_num_workers", "4", "--output_dir", str(out),
            "--delta", "1e-3", "--target_epsilon", "8", "--num_inference_steps", "1", "--checkpointing_steps", "0",
            "--ema_decay", "0", "--privacy_seed", "1"]
    assert recipe_main("lora", "test", argv) == 0
    printed = capsys.readouterr().out
    assert "DP-SGD: sigma =" in printed and "after 2 DP-SGD steps" in printed

    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["validation_prompts"] == ["a red chair", "a blue cup"]
    assert generation["class_prompts"] == ["a red chair"]  # captions only: the user's prompt, not 'a photo of an image'
    card = (out / "README.md").read_text()
    assert 'pipe("a red chair"' in card and "a photo of an image" not in card
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["widget"] == [{"text": "a red chair", "output": {"url": "samples.png"}},
                                  {"text": "a blue cup", "output": {"url": "samples.png"}}]
    with Image.open(out / "samples.png") as grid:  # a row per validation prompt, --num_validation_images per row
        assert grid.size[0] == grid.size[1]
    released = "".join((out / name).read_text() for name in ("README.md", "generation_config.json", "privacy.json",
                                                                "training_config.yaml"))
    assert "secret caption" not in released
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["objective"]["noise_offset"] == 0.05 and privacy["batch_size"] == 4 and privacy["steps"] == 2
    replay = yaml.safe_load((out / "training_config.yaml").read_text())
    assert replay["batch_size"] == 4 and replay["physical_batch_size"] == 2 and "train_batch_size" not in replay
    assert (hf / "dpdiff_latent_cache" / "manifest.json").is_file()  # the latent cache under the cache root


def test_a_captions_only_set_without_prompts_falls_back_to_the_trained_empty_prompt(tmp_path):
    source = load_source(f"imagefolder:{_captioned_folder(tmp_path / 'data')}")
    args = _args([])
    generation = outputs.generation_config(args, source, 16, 3)
    assert generation["class_prompts"] == [""] and "validation_prompts" not in generation
    prompts, labels, per_row = diffusers_run.sample_rows(source, args, 8)
    assert set(prompts) == {""} and per_row == 8
    assert diffusers_run.sample_rows(source, _args(["--cond_dropout", "0"]), 8) is None  # no prompt training saw: no grid
    labelled = load_source("mnist5k", limit=20)
    assert outputs.generation_config(args, labelled, 16, 1)["class_prompts"] == labelled.class_prompts


def test_dreambooth_flat_folder_is_one_class_captioned_by_the_instance_prompt(tmp_path):
    folder = tmp_path / "dog"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (50 * i, 0, 0)).save(folder / f"{i}.jpg")
    args = _args(["--instance_data_dir", str(folder), "--instance_prompt", "a photo of sks dog"])
    source = diffusers_run.training_source(args)
    assert list(source.dataset["prompt"]) == ["a photo of sks dog"] * 3 and source.class_prompts == ["a photo of sks dog"]
    assert outputs.generation_config(args, source, 16, 3)["class_prompts"] == ["a photo of sks dog"]
    with pytest.raises(Exception, match="images lie directly"):  # without a caption the flat folder stays an error
        diffusers_run.training_source(_args(["--train_data_dir", str(folder)]))
