"""The tiny SD-format preset: stock classes, exact save/load round trip, offline sampling, a
tokenizer that takes any prompt, and clear errors for folders that are not pipelines."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from dpdiff.errors import ConfigError
from dpdiff.pipelines import PRESET_DIR, PRESET_NAME, load_pipeline, resolve_model_path
from dpdiff.pipelines.preset import UNET_CONFIG, build_tiny_pipeline, unet_size_overrides
from dpdiff.pipelines.tokenizer import build_tokenizer


def test_round_trip_is_bit_exact(tiny_pipeline_dir, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert type(pipe) is StableDiffusionPipeline
    pipe.save_pretrained(tmp_path / "again", safe_serialization=True)
    for component in ("unet", "vae", "text_encoder"):
        a = load_file(next((tiny_pipeline_dir / component).glob("*.safetensors")))
        b = load_file(next((tmp_path / "again" / component).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_samples_offline_and_deterministic(tiny_pipeline_dir):
    pipe = load_pipeline(str(tiny_pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="np")
    a = pipe(["a photo of a sneaker"], generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(["a photo of a sneaker"], generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 32, 32, 3) and (a == b).all()


def test_any_prompt_tokenizes_unseen_words():
    tok = build_tokenizer(["a photo of a bear", "a photo of a digit 7"], num_merges=30)
    for text in ["a photo of a sneaker", "ünïcode ✓ 日本", "ANKLE-BOOT!!"]:
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids[1:-1]
        # CLIP's decoder puts spaces around punctuation; the characters themselves survive
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
    # learned merges make seen words short
    assert len(tok("bear").input_ids) == 3


def test_preset_is_packaged_and_loads():
    if not (PRESET_DIR / "model_index.json").is_file():
        pytest.skip("the preset is built by recipes/pretrain_public.py")
    pipe = load_pipeline(PRESET_NAME)
    assert type(pipe) is StableDiffusionPipeline
    manifest = json.loads((PRESET_DIR / "manifest.json").read_text())
    assert manifest["public_data"].keys() == {"mnist5k", "animal_mnist"}
    size = sum(f.stat().st_size for f in PRESET_DIR.rglob("*") if f.is_file())
    assert size < 30 * 2**20


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a diffusers pipeline folder"):
        resolve_model_path(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_model_path(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path("./no/such/folder")
    assert resolve_model_path("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"


def test_non_safetensors_weights_refused(tiny_pipeline_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_pipeline_dir, copy)
    for f in (copy / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ConfigError, match="safetensors"):
        resolve_model_path(copy)

def test_wider_deeper_preset_unet_keeps_vae_and_text_encoder():
    """A bigger denoiser is the only thing `unet_size_overrides` changes; bad widths fail before any work."""
    prompts = ["a photo of a digit 1"]
    small = build_tiny_pipeline(prompts, seed=0)
    big = build_tiny_pipeline(prompts, seed=0, **unet_size_overrides((16, 32, 64), 2))
    assert tuple(big.unet.config.block_out_channels) == (16, 32, 64) and big.unet.config.layers_per_block == 2
    assert tuple(small.unet.config.block_out_channels) == tuple(UNET_CONFIG["block_out_channels"])
    for part in ("vae", "text_encoder"):
        a, b = getattr(small, part).state_dict(), getattr(big, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    latents = torch.randn(2, 4, 8, 8)
    out = big.unet(latents, torch.tensor([10, 500]), torch.randn(2, 77, big.unet.config.cross_attention_dim)).sample
    assert out.shape == latents.shape
    assert unet_size_overrides() == {}
    for widths in [(12, 24), (64,), (8, 16, 32, 64, 128)]:
        with pytest.raises(ValueError, match="multiple of 8|2 to 4 widths"):
            unet_size_overrides(widths)
    with pytest.raises(ValueError, match="at least 1"):
        unet_size_overrides(layers_per_block=0)
