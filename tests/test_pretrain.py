"""The public pretraining recipe runs end to end on a tiny subset (CI never runs the full hour)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from diffusers import StableDiffusionPipeline

from dpdiff.pipelines import load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_pretrain_recipe_few_steps(tmp_path):
    out = tmp_path / "preset"
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain_public.py"), "--output_dir", str(out),
           "--vae_steps", "3", "--unet_steps", "3", "--limit", "40", "--vae_batch_size", "8", "--batch_size", "8",
           "--eval_examples", "16", "--recon_grid", str(tmp_path / "recon.png"),
           "--unet_block_out_channels", "16", "32", "--unet_layers_per_block", "1"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vae"]["steps"] == 3 and manifest["num_images"] == 80
    assert manifest["unet_size"]["block_out_channels"] == [16, 32] and manifest["unet_size"]["layers_per_block"] == 1
    assert set(manifest["public_data"]) == {"mnist5k", "animal_mnist"}
    assert isinstance(manifest["evaluation"]["fashion_mnist_test_recon_mse"], float)
    assert (tmp_path / "recon.png").stat().st_size > 0
    pipe = load_pipeline(out)
    assert type(pipe) is StableDiffusionPipeline
    assert list(pipe.unet.config.block_out_channels) == [16, 32]
    assert abs(pipe.vae.config.scaling_factor - manifest["latent_scaling_factor"]) < 1e-6
    # no private class word shaped the tokenizer: it was built from the public prompts only
    assert "sneaker</w>" not in pipe.tokenizer.get_vocab()
