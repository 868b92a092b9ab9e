"""Mixed precision under DP: forward/backward under bf16 (or fp16) autocast, while the per-example
gradients, clipping, noise and the step stay fp32 (master weights)."""

import math

import pytest
import torch

from dpdiff.errors import ConfigError
from dpdiff.privacy.diffusion_loss import draw_diffusion_inputs
from dpdiff.privacy.factored import FactoredGradSample
from test_engine import TOKENS, flat_params, make_engine


def per_example(engine, latents, hidden, noise, t):
    engine.per_example_backward(latents, hidden, noise, t)
    return torch.cat([p.grad_sample.flatten(1) for p in engine.params], dim=1)


@pytest.mark.parametrize("method", ["lora", "attention"])
def test_bf16_per_example_gradients_are_fp32_and_close_to_the_fp32_ones(method):
    targets = ["to_q", "to_k", "to_v", "to_out.0"] if method == "lora" else None
    fp32 = make_engine(method, lora_targets=targets)
    bf16 = make_engine(method, lora_targets=targets, precision="bf16")
    g = torch.Generator().manual_seed(5)
    latents, hidden = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, TOKENS, 64, generator=g)
    _, noise, t = draw_diffusion_inputs(latents, 1, 1000, [g, g, g])
    exact, low = per_example(fp32, latents, hidden, noise, t), per_example(bf16, latents, hidden, noise, t)
    assert all(p.grad_sample.dtype == torch.float32 for p in bf16.params)
    assert all(p.dtype == torch.float32 for p in bf16.params)  # master weights
    assert not torch.equal(exact, low)  # the forward really ran in bf16
    # bf16 keeps 8 mantissa bits: each example's gradient within a few percent of the fp32 one
    relative = (exact - low).norm(dim=1) / exact.norm(dim=1)
    assert float(relative.max()) < 0.05, relative
    cosine = torch.nn.functional.cosine_similarity(exact, low, dim=1)
    assert float(cosine.min()) > 0.998


def test_bf16_noise_is_drawn_in_fp32_with_std_sigma_c():
    """An empty batch releases noise only: its scale and resolution are those of fp32 draws."""
    sigma, c, b = 2.0, 0.5, 4
    engine = make_engine("lora", noise_multiplier=sigma, max_grad_norm=c, batch_size=b, precision="bf16")
    before = flat_params(engine)
    engine._logical_step([])
    noise = (before - flat_params(engine)) * b
    assert noise.std().item() == pytest.approx(sigma * c, rel=0.03)
    # bf16 rounding would leave at most 256 distinct values per binade; fp32 draws are (nearly) all distinct
    assert noise.unique().numel() > 0.99 * noise.numel()


@pytest.mark.parametrize("method", ["lora", "attention", "full"])  # attention/full: book-keeping (factored) layers too
def test_bf16_clipped_contributions_stay_within_c(method):
    c, lr = 1e-3, 1.0 if method == "lora" else 1e4  # large lr: fp32 rounding of W - lr*g stays far below C
    engine = make_engine(method, max_grad_norm=c, noise_multiplier=0.0, batch_size=4, physical_batch_size=4, lr=lr,
                         precision="bf16")
    before = flat_params(engine)
    stats = engine._logical_step([0])
    moved = (before - flat_params(engine)) * 4 / lr  # expected batch 4: the clipped gradient of example 0
    assert stats.nonfinite_examples == 0
    assert moved.norm() <= c * (1 + 1e-5) and moved.norm() > 0.5 * c


@pytest.mark.parametrize("method", ["lora", "attention", "full"])
def test_an_example_whose_low_precision_gradient_overflows_contributes_zero(method):
    engine = make_engine(method, precision="fp16", max_grad_norm=1.0, batch_size=4, physical_batch_size=4)
    g = torch.Generator().manual_seed(1)
    latents, hidden = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, TOKENS, 64, generator=g)
    latents[1] = 1e6  # fp16 overflows on this example only
    _, noise, t = draw_diffusion_inputs(latents, 1, 1000, [g, g])
    engine.per_example_backward(latents, hidden, noise, t)
    assert (method == "lora") != any(isinstance(p.grad_sample, FactoredGradSample) for p in engine.params)
    rows = torch.cat([p.grad_sample.flatten(1) for p in engine.params], dim=1)
    assert torch.isfinite(rows).all()
    assert rows[1].abs().max() == 0 and rows[0].abs().max() > 0
    assert engine._nonfinite == 1


def test_unknown_precision_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="precision"):
        make_engine("lora", precision="int8")
