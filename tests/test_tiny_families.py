"""The tiny random-weight family pipelines: stock classes, save/load round trip, sampling, LoRA round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

from dpdiff.pipelines.tiny_families import (
    FAMILY_BUILDS,
    NATIVE_RESOLUTIONS,
    build_tiny_family_pipeline,
    save_tiny_family_pipeline,
)

PROMPTS = ["a photo of a cat", "an unseen wörd, zebra!"]
EXPECTED_CLASS = {
    "sd15": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
    "pixart_alpha": "PixArtAlphaPipeline", "pixart_sigma": "PixArtSigmaPipeline", "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline", "sana": "SanaPipeline", "dit": "DiTPipeline",
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core box OpenMP contention makes them 20x slower."""
    torch.set_num_threads(1)  # conftest restores the previous count after each test


def generate(pipe, name: str) -> np.ndarray:
    kwargs = dict(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    if name == "dit":
        return pipe(class_labels=pipe.get_label_ids(["cat", "truck"]), **kwargs).images
    kwargs.update(prompt=PROMPTS, height=32, width=32)
    if name in ("pixart_alpha", "pixart_sigma", "sana"):
        kwargs.update(use_resolution_binning=False, max_sequence_length=pipe.tokenizer.model_max_length)
    if name == "sana":
        kwargs.update(complex_human_instruction=None)
    if name in ("sd3", "flux"):
        kwargs.update(max_sequence_length=16)
    return pipe(**kwargs).images


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


@pytest.mark.parametrize("name", FAMILY_BUILDS)
def test_family_build_save_load_generate_lora(name, tmp_path):
    pipe = build_tiny_family_pipeline(name, seed=0)
    assert type(pipe).__name__ == EXPECTED_CLASS[name]
    assert all(p.dtype == torch.float32 for p in denoiser(pipe).parameters())
    again = denoiser(build_tiny_family_pipeline(name, seed=0)).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in denoiser(pipe).state_dict().items())
    images = generate(pipe, name)
    size = NATIVE_RESOLUTIONS["dit"] if name == "dit" else 32  # DiTPipeline samples at its sample size only
    assert images.shape == (2, size, size, 3) and np.isfinite(images).all()

    # save_pretrained (safetensors) -> DiffusionPipeline.from_pretrained: same class, same samples
    path = save_tiny_family_pipeline(name, tmp_path / name, seed=0)
    assert list(path.rglob("*.safetensors")) and not list(path.rglob("*.bin"))
    loaded = DiffusionPipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    np.testing.assert_allclose(generate(loaded, name), images, atol=1e-5)

    # a LoRA on to_q/to_k/to_v/to_out.0 changes samples and survives save -> load by the family's own loader
    # (the pipeline's load_lora_weights where it has the mixin; plain peft on PixArt/DiT, which have none)
    torch.manual_seed(1)
    inject_adapter_in_model(lora_config(), denoiser(pipe))
    with_lora = generate(pipe, name)
    assert np.abs(with_lora - images).max() > 1e-3
    state = get_peft_model_state_dict(denoiser(pipe))
    if hasattr(loaded, "load_lora_weights"):
        key = "unet_lora_layers" if hasattr(loaded, "unet") else "transformer_lora_layers"
        type(pipe).save_lora_weights(tmp_path / "lora", **{key: state}, safe_serialization=True)
        loaded.load_lora_weights(tmp_path / "lora")
    else:
        inject_adapter_in_model(lora_config(), denoiser(loaded))
        assert not set_peft_model_state_dict(denoiser(loaded), state).unexpected_keys
    np.testing.assert_allclose(generate(loaded, name), with_lora, atol=1e-5)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown tiny family"):
        build_tiny_family_pipeline("sd4")


# the real checkpoints' VAE factor and default size (SD-1.5 and PixArt-alpha 512, SD-2 v 768, DiT 256, the rest 1024)
REAL = {"sd15": (8, 512), "sd2": (8, 768), "sdxl": (8, 1024), "pixart_alpha": (8, 512), "pixart_sigma": (8, 1024),
        "sd3": (8, 1024), "flux": (8, 1024), "sana": (32, 1024), "dit": (8, 256)}


@pytest.mark.parametrize("name", FAMILY_BUILDS)
def test_builds_have_the_real_vae_factor_and_default_size(name):
    from dpdiff.families import family_for_pipeline
    from dpdiff.families.base import vae_scale_factor

    pipe = build_tiny_family_pipeline(name)
    family = family_for_pipeline(pipe)
    assert (vae_scale_factor(pipe), family.resolution(pipe)) == REAL[name] and NATIVE_RESOLUTIONS[name] == REAL[name][1]
    if name in ("sd3", "flux"):
        assert len(pipe.vae.config.block_out_channels) == 4 and pipe.vae.config.latent_channels == 16
