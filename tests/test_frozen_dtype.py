"""Frozen weights in the run's precision (issue 39): under --mixed_precision bf16/fp16 the frozen denoiser base,
VAE and text encoders are kept in that dtype, the trained parameters in fp32, and the per-example gradient
path (every grad-sample mode) still gives each example's own fp32 gradient under autocast."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler

from dpdiff.adapters import prepare_trainable
from dpdiff.families import family_for_pipeline
from dpdiff.pipelines.loading import cast_frozen, cast_frozen_weights, load_dtype
from dpdiff.pipelines.preset import SCHEDULER_CONFIG, build_tiny_pipeline, build_tiny_unet
from dpdiff.privacy.diffusion_loss import draw_diffusion_inputs, per_row_loss
from dpdiff.privacy.engine import DPDiffusionEngine
from test_engine import TOKENS, LatentCache

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def test_frozen_weights_take_the_precision_and_trained_ones_stay_fp32():
    pipe = build_tiny_pipeline(["a photo of a shirt"], seed=0)
    prepare_trainable(pipe.unet, "lora", rank=4)
    for component in family_for_pipeline(pipe).frozen_components(pipe):
        component.requires_grad_(False)
    cast_frozen_weights(pipe, "bf16")
    unet = dict(pipe.unet.named_parameters())
    assert {p.dtype for n, p in unet.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in unet.items() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} | {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    cast_frozen_weights(pipe, "no")  # back to fp32 everywhere
    assert {p.dtype for p in pipe.components["unet"].parameters()} == {torch.float32}


def test_fp16_keeps_a_vae_that_asks_for_upcasting_in_fp32():
    pipe = build_tiny_pipeline(["a photo of a shirt"], seed=0)
    pipe.vae.register_to_config(force_upcast=True)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    cast_frozen_weights(pipe, "fp16")
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.float16}


def test_lora_loads_straight_into_the_weight_dtype_but_pretrained_weights_that_train_load_fp32():
    assert load_dtype("bf16", "lora") == torch.bfloat16
    assert load_dtype("bf16", "lora", train_condition_embedder=True) == torch.float32  # the embedder starts exact
    assert load_dtype("bf16", "attention") == torch.float32
    assert load_dtype("no", "lora") == torch.float32


def _engine(method, mode, precision):
    unet = build_tiny_unet(seed=0)
    prepare_trainable(unet, method, target_modules=["to_q", "to_k", "to_v", "to_out.0"] if method == "lora" else None)
    with torch.no_grad():  # LoRA B starts at 0, which zeroes A's gradient: move it so both are checked
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    cast_frozen(unet, DTYPES[precision])
    reference = copy.deepcopy(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    engine = DPDiffusionEngine(unet, DDPMScheduler(**SCHEDULER_CONFIG), torch.optim.SGD(params, lr=1.0), LatentCache(8),
                               batch_size=4, physical_batch_size=4, noise_multiplier=0.0, max_grad_norm=1.0,
                               privacy_seed=0, grad_sample_mode=mode, precision=precision)
    return engine, reference


def _alone(reference, engine, latents, hidden, noise, t, dtype):
    """The gradient of one example's loss, computed alone by plain autograd on a copy under the same autocast."""
    reference.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        loss = per_row_loss(reference, engine.noise_scheduler, latents, hidden, noise, t).mean()
    loss.backward()
    return torch.cat([p.grad.float().flatten() for p in reference.parameters() if p.requires_grad])


@pytest.mark.parametrize("method, mode, precision", [
    ("lora", "fused", "bf16"), ("lora", "hooks", "bf16"), ("lora", "functorch", "bf16"), ("attention", "fused", "bf16"),
    ("attention", "hooks", "bf16"), ("lora", "fused", "fp16"), ("attention", "fused", "fp16")])
def test_per_example_gradients_with_low_precision_frozen_weights_are_each_examples_own(method, mode, precision):
    engine, reference = _engine(method, mode, precision)
    assert engine.grad_sample_mode == mode
    g = torch.Generator().manual_seed(5)
    latents, hidden = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, TOKENS, 64, generator=g)
    _, noise, t = draw_diffusion_inputs(latents, 1, 1000, [g, g, g])
    engine.per_example_backward(latents, hidden, noise, t)
    assert all(p.dtype == torch.float32 and p.grad_sample.dtype == torch.float32 for p in engine.params)
    rows = torch.cat([p.grad_sample.flatten(1) for p in engine.params], dim=1)
    for i in range(3):
        alone = _alone(reference, engine, latents[i : i + 1], hidden[i : i + 1], noise[i : i + 1], t[i : i + 1], DTYPES[precision])
        assert alone.norm() > 0
        # both ran their forward in low precision, in different kernels: a few percent apart at most
        assert float((rows[i] - alone).norm() / alone.norm()) < 0.05
        assert float(torch.nn.functional.cosine_similarity(rows[i], alone, dim=0)) > 0.998


@pytest.mark.parametrize("method", ["lora", "attention"])
def test_a_dp_step_with_bf16_frozen_weights_moves_only_the_fp32_trained_parameters(method):
    engine, _ = _engine(method, "auto", "bf16")
    frozen = {n: p.detach().clone() for n, p in engine.model.named_parameters() if not p.requires_grad}
    trained = torch.cat([p.detach().flatten() for p in engine.params]).clone()
    stats = engine._logical_step([0, 1, 2])
    assert stats.nonfinite_examples == 0
    assert all(torch.equal(p, frozen[n]) for n, p in engine.model.named_parameters() if not p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for n, p in engine.model.named_parameters() if not p.requires_grad)
    moved = torch.cat([p.detach().flatten() for p in engine.params]) - trained
    assert moved.norm() > 0 and all(p.dtype == torch.float32 for p in engine.params)


def test_the_vae_leaves_the_accelerator_with_the_text_encoders_and_samples_run_under_autocast():
    from dpdiff.training.loop import _Encoders

    pipe = build_tiny_pipeline(["a photo of a shirt"], seed=0)
    encoders = _Encoders(pipe, family_for_pipeline(pipe), "cpu", 32, precision="bf16")
    assert set(encoders.names) == {"text_encoder", "vae"}
    assert not torch.is_autocast_enabled("cpu")
    with encoders.loaded():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_a_bf16_attention_run_exports_a_denoiser_that_stock_diffusers_runs_in_fp32(tiny_pipeline_dir, tmp_path, monkeypatch):
    """The frozen weights trained in bf16, the attention blocks in fp32: the exported `unet/` holds both dtypes
    (the bf16-rounded frozen weights the training saw); stock `from_pretrained` loads it as one fp32 model."""
    from accelerate.state import AcceleratorState
    from diffusers import UNet2DConditionModel

    from dpdiff.training.loop import finetune
    from test_finetune import parse, small_run_flags

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)  # a process-wide singleton
    out = tmp_path / "run"
    try:
        finetune(parse(small_run_flags(tiny_pipeline_dir, out, max_steps=2, checkpointing_steps=0, method="attention"),
                       method="attention"))
    finally:
        AcceleratorState._reset_state(True)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert {p.dtype for p in unet.parameters()} == {torch.float32}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sample = unet(torch.randn(1, 4, 8, 8, generator=g), 10, encoder_hidden_states=torch.randn(1, 6, 64, generator=g)).sample
    assert torch.isfinite(sample).all()
