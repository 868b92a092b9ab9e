"""The memory plan (issue 39): peak device memory from the configs on the meta device, before any data or
weights are loaded; one refusal that names the flags to change; `--dry_run`; near a measured peak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpdiff.errors import ConfigError
from dpdiff.training.memory_plan import GIB, plan_memory
from test_finetune import parse, small_run_flags

ROOT = Path(__file__).resolve().parent.parent


def test_the_plan_counts_the_weights_of_the_real_build_by_dtype(tiny_pipeline_dir):
    from dpdiff.adapters import prepare_trainable
    from dpdiff.pipelines import load_pipeline

    plan = plan_memory(tiny_pipeline_dir, method="lora", precision="bf16", physical_batch_size=2, rank=4, ema=False,
                       free_bytes=100 * GIB)
    real = load_pipeline(tiny_pipeline_dir)
    real.unet.train()
    prepare_trainable(real.unet, "lora", rank=4)
    trained = sum(p.numel() for p in real.unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in real.unet.parameters())
    assert (plan.trained_params, plan.total_params) == (trained, total)
    assert plan.weight_bytes == 2 * (total - trained) + 4 * trained  # frozen bf16, trained fp32
    assert plan.state_bytes == 4 * trained * 2  # Adam's two moments (no EMA here)
    assert plan.step_bytes == 4 * trained  # the clipped sum, noised in place (the noise is no second copy)
    encoders = sum(p.numel() for m in (real.vae, real.text_encoder) for p in m.parameters())
    assert plan.encoder_bytes == 2 * encoders and plan.encoders_resident  # a CPU: the same memory
    assert plan.fits()


def test_the_plan_grows_with_the_batch_and_shrinks_with_checkpointing_and_low_precision(tiny_pipeline_dir):
    def plan(**kw):
        settings = dict(method="attention", precision="bf16", physical_batch_size=1, free_bytes=100 * GIB) | kw
        return plan_memory(tiny_pipeline_dir, **settings)

    one, four = plan(), plan(physical_batch_size=4)
    assert 3.5 < four.activation_bytes / one.activation_bytes <= 4.0
    assert four.per_example_bytes == 4 * one.per_example_bytes
    assert plan(noise_multiplicity=4).activation_bytes == four.activation_bytes  # K draws are K rows per forward
    assert plan(physical_batch_size=4, gradient_checkpointing=True).activation_bytes < 0.6 * four.activation_bytes
    assert plan(precision="no").weight_bytes > one.weight_bytes
    assert 3.5 < plan(resolution=64).activation_bytes / one.activation_bytes <= 4.0  # 2x the native 32 px: 4x the latents


def test_a_run_that_cannot_fit_is_refused_naming_the_flags_to_change(tiny_pipeline_dir):
    plan = plan_memory(tiny_pipeline_dir, method="lora", precision="no", physical_batch_size=8, free_bytes=GIB // 100)
    with pytest.raises(ConfigError) as err:
        plan.check()
    message = str(err.value)
    for flag in ("--physical_batch_size", "--gradient_checkpointing", "--mixed_precision", "--dry_run"):
        assert flag in message
    # nothing left to shrink but the model: say so instead of naming flags that are already set
    tight = plan_memory(tiny_pipeline_dir, method="lora", precision="bf16", physical_batch_size=1,
                        gradient_checkpointing=True, free_bytes=GIB // 100)
    with pytest.raises(ConfigError, match="--resolution"):
        tight.check()


@pytest.fixture
def nothing_loaded(monkeypatch):
    """The data and the weights must not be touched before the plan has spoken."""
    import dpdiff.training.loop as loop

    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the memory plan")

    for name in ("load_source", "load_training_source", "load_pipeline"):  # whichever the loop reads the data with
        monkeypatch.setattr(loop, name, refuse, raising=False)


def test_dry_run_prints_the_plan_and_loads_nothing(tiny_pipeline_dir, tmp_path, nothing_loaded, capsys):
    from dpdiff.training.loop import finetune

    out = tmp_path / "run"
    result = finetune(parse(small_run_flags(tiny_pipeline_dir, out, dry_run=True)))
    assert result.record["dry_run"] and result.pipeline is None
    printed = capsys.readouterr().out
    assert "memory plan: sd lora" in printed and "peak" in printed
    assert not out.exists()  # a dry run leaves nothing behind


def test_a_run_too_big_for_the_device_stops_before_the_data_and_weights(tiny_pipeline_dir, tmp_path, nothing_loaded):
    from dpdiff.training.loop import finetune

    with pytest.raises(ConfigError, match="--physical_batch_size"):
        finetune(parse(small_run_flags(tiny_pipeline_dir, tmp_path / "run", device_memory_gib=0.01)))


@pytest.mark.parametrize("build", ["sdxl", "pixart_alpha", "sd3", "flux", "sana", "dit"])
def test_every_family_gets_a_plan(build, tmp_path):
    from dpdiff.pipelines.tiny_families import build_tiny_family_pipeline

    from dpdiff.families import family_for_pipeline
    from dpdiff.families.base import vae_scale_factor

    pipe = build_tiny_family_pipeline(build)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    plain = plan_memory(tmp_path, method="lora", precision="bf16", physical_batch_size=2, free_bytes=100 * GIB)
    native = family_for_pipeline(pipe).resolution(pipe)  # the plan's default size and VAE factor are the pipeline's
    assert plain.latent == (native // vae_scale_factor(pipe),) * 2
    assert plan_memory(tmp_path, method="lora", precision="bf16", physical_batch_size=2, resolution=native,
                       free_bytes=100 * GIB).activation_bytes == plain.activation_bytes
    checkpointed = plan_memory(tmp_path, method="lora", precision="bf16", physical_batch_size=2, gradient_checkpointing=True,
                               free_bytes=100 * GIB)
    assert plain.trained_params > 0 and plain.activation_bytes > 0 and plain.encoder_bytes > 0
    assert checkpointed.activation_bytes < plain.activation_bytes


MEASURE = """
import json, sys
sys.path.insert(0, "benchmarks")
import torch
import _overhead_models as om
from diffusers import DDPMScheduler
from dpdiff.adapters import prepare_trainable
from dpdiff.pipelines.loading import cast_frozen
from dpdiff.pipelines.preset import SCHEDULER_CONFIG, build_tiny_unet
from dpdiff.privacy.engine import DPDiffusionEngine
from dpdiff.training.latent_cache import LatentCache

torch.set_num_threads(1)
om.release_freed_memory_to_os()
unet = build_tiny_unet(seed=0, block_out_channels=(64, 128), layers_per_block=2, sample_size=32)
prepare_trainable(unet, "attention")
cast_frozen(unet, torch.bfloat16)
n = 8
g = torch.Generator().manual_seed(0)
data = LatentCache.per_example(torch.randn(n, 4, 32, 32, generator=g), {"encoder_hidden_states": torch.randn(n, 6, 64, generator=g)})
params = [p for p in unet.parameters() if p.requires_grad]
engine = DPDiffusionEngine(unet, DDPMScheduler(**SCHEDULER_CONFIG), torch.optim.AdamW(params), data, batch_size=n,
                           physical_batch_size=n, noise_multiplier=1.0, max_grad_norm=1.0, privacy_seed=0, precision="bf16")
with om.PeakRSS("cpu") as peak:
    engine._logical_step(list(range(n)))
print(json.dumps({"step_bytes": peak.used}))
"""


def test_the_plan_is_near_the_measured_peak_of_a_step():
    """Loosely (RSS on a shared machine): what one DP step adds on top of the weights, measured in a fresh process,
    against the plan's trained state + per-example gradients + activations (benchmarks/real_shapes.py: real sizes)."""
    from dpdiff.families.registry import family_named
    from dpdiff.pipelines.preset import build_tiny_unet
    from dpdiff.training.memory_plan import plan_denoiser

    out = subprocess.run([sys.executable, "-c", MEASURE], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["step_bytes"]
    with torch.device("meta"):
        unet = build_tiny_unet(seed=0, block_out_channels=(64, 128), layers_per_block=2, sample_size=32)
    plan = plan_denoiser(family_named("sd"), unet, method="attention", precision="bf16", rows=8, latent=(32, 32),
                         text_tokens=6, resolution=256, ema=False)
    planned = plan.peak_bytes - plan.weight_bytes - plan.runtime_bytes
    assert 0.5 < planned / measured < 2.0, (planned, measured)
