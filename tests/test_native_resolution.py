"""Every family trains at its native default resolution (the real VAE factor and sample size: 512 px SD-1.5
and PixArt-alpha, 768 px SD-2 v, 1024 px SDXL/PixArt-Sigma/SD3/Flux/Sana, 256 px DiT), from captioned
JPEGs through the on-disk latent cache: the paths real users take, on tiny widths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dpdiff.adapters import prepare_trainable
from dpdiff.families import family_for_pipeline
from dpdiff.pipelines.tiny_families import FAMILY_BUILDS, NATIVE_RESOLUTIONS, build_tiny_family_pipeline
from dpdiff.privacy.engine import DPDiffusionEngine
from dpdiff.training.latent_cache import build_latent_cache


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("native") / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
        rows.append({"file_name": f"{i}.jpg", "text": f"a photo of item {i}", "label": ["cat", "dog"][i]})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.mark.parametrize("build", FAMILY_BUILDS)
def test_each_family_trains_at_its_native_resolution(build, jpegs, tmp_path):
    from dpdiff.data import load_source

    pipe = build_tiny_family_pipeline(build)
    family = family_for_pipeline(pipe)
    resolution = family.resolution(pipe)
    assert resolution == NATIVE_RESOLUTIONS[build]
    cache = build_latent_cache(pipe, load_source(f"imagefolder:{jpegs}"), resolution, show_progress=False,
                               cache_dir=tmp_path / "cache", family=family)
    factor = 32 if build == "sana" else 8
    assert cache[0]["latents"].shape[-1] == resolution // factor
    denoiser = family.denoiser(pipe)
    family.train_mode(denoiser)
    prepare_trainable(denoiser, "lora", rank=2, family=family)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    engine = DPDiffusionEngine(denoiser, family.training_scheduler(pipe), torch.optim.SGD(params, lr=1.0), cache,
                               family=family, objective=family.objective(family.training_scheduler(pipe)),
                               batch_size=2, physical_batch_size=2, noise_multiplier=0.5, max_grad_norm=1.0, privacy_seed=0)
    stats = engine.step()
    assert engine.steps_taken == 1 and np.isfinite(stats.loss if stats.num_examples else 0.0)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_the_loop_trains_at_the_native_resolution_by_default(jpegs, tmp_path):
    """No --resolution: the base model's own size (DiT's 256 px), recorded with the run."""
    from dpdiff.pipelines.tiny_families import save_tiny_family_pipeline
    from dpdiff.training.arguments import finetune_args
    from dpdiff.training.loop import finetune

    base = save_tiny_family_pipeline("dit", tmp_path / "base")
    result = finetune(finetune_args(
        pretrained_model_name_or_path=str(base), output_dir=str(tmp_path / "run"), dataset=f"imagefolder:{jpegs}",
        batch_size=2, physical_batch_size=2, max_steps=1, delta=1e-2, num_inference_steps=1, checkpointing_steps=0,
        privacy_seed=1, rank=2, ema_decay=0.0, max_grad_norm=1.0,
    ))
    assert result.record["steps"] == 1
    manifest = json.loads((tmp_path / "run" / "latent_cache" / "manifest.json").read_text())
    assert manifest["fingerprint"]["parts"]["resolution"] == 256
    assert json.loads((tmp_path / "run" / "generation_config.json").read_text())["resolution"] == 256
