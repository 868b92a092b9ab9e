"""Gradient checkpointing under DP: the fused per-example gradients (LoRA, Linear, Conv2d, norms) survive the
recomputation of checkpointed blocks (compared with the same run unchecked); Opacus hooks do not, so any
trained parameter on hooks refuses it before any work."""

import pytest
import torch
from diffusers import DDPMScheduler

from dpdiff.adapters import prepare_trainable
from dpdiff.errors import ConfigError
from dpdiff.pipelines.preset import SCHEDULER_CONFIG, build_tiny_unet
from dpdiff.privacy.diffusion_loss import draw_diffusion_inputs
from dpdiff.privacy.engine import DPDiffusionEngine
from dpdiff.privacy.fused_layers import unfused_trainable
from dpdiff.training.latent_cache import LatentCache

LINEAR_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def _unet(targets=LINEAR_TARGETS, method="lora"):
    unet = build_tiny_unet(seed=0)
    prepare_trainable(unet, method, **({"rank": 4, "target_modules": targets} if method == "lora" else {}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 would zero every A gradient
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return unet


def _cache(n=12):
    g = torch.Generator().manual_seed(1)
    return LatentCache.per_example(torch.randn(n, 4, 8, 8, generator=g), {"encoder_hidden_states": torch.randn(n, 6, 64, generator=g)})


def _engine(unet, **kwargs):
    params = [p for p in unet.parameters() if p.requires_grad]
    settings = dict(batch_size=6, physical_batch_size=3, noise_multiplier=0.7, max_grad_norm=0.01, privacy_seed=3,
                    noise_multiplicity=2)
    settings.update(kwargs)
    return DPDiffusionEngine(unet, DDPMScheduler(**SCHEDULER_CONFIG), torch.optim.SGD(params, lr=1.0), _cache(), **settings)


# Linear LoRA; LoRA on 3x3/1x1 convolutions too; the attention blocks (1x1 proj_in/out); every parameter
@pytest.mark.parametrize("method, targets", [("lora", LINEAR_TARGETS), ("lora", ["to_q", "conv1", "proj_in"]),
                                             ("attention", None), ("full", None)])
def test_checkpointed_per_example_gradients_equal_the_unchecked_run(method, targets):
    plain, checked = _unet(targets, method), _unet(targets, method)
    checked.enable_gradient_checkpointing()
    assert checked.is_gradient_checkpointing
    engines = [_engine(plain), _engine(checked)]
    assert [e.grad_sample_mode for e in engines] == ["fused", "fused"]
    g = torch.Generator().manual_seed(5)
    latents, hidden = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 6, 64, generator=g)
    _, noise, t = draw_diffusion_inputs(latents, 2, 1000, [g, g, g])
    for engine in engines:
        engine.per_example_backward(latents, hidden, noise, t)
    for (name, a), b in zip(((n, p) for n, p in plain.named_parameters() if p.requires_grad), engines[1].params):
        assert a.grad_sample.shape == (3, *a.shape) and a.grad_sample.abs().max() > 0, name
        torch.testing.assert_close(b.grad_sample, a.grad_sample, rtol=1e-5, atol=1e-7)
        assert b.grad is None, name  # autograd summed nothing during the recomputation either


def test_checkpointed_dp_steps_release_what_the_unchecked_run_releases():
    plain, checked = _unet(), _unet()
    checked.enable_gradient_checkpointing()
    engines = [_engine(plain), _engine(checked)]
    for _ in range(2):  # Poisson sampling, K = 2, two micro-batches, clipping and noise: same secret seeds
        stats = [e.step() for e in engines]
        assert stats[0].num_examples == stats[1].num_examples
    for a, b in zip(engines[0].params, engines[1].params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method, targets", [("lora", ["to_q", "conv1"]), ("attention", None), ("full", None)])
def test_checkpointing_on_opacus_hooks_is_refused(method, targets):
    unet = build_tiny_unet(seed=0)
    prepare_trainable(unet, method, target_modules=targets)
    unet.enable_gradient_checkpointing()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        _engine(unet, grad_sample_mode="hooks")


def test_checkpointing_with_a_trained_layer_the_fused_mode_leaves_to_hooks_is_refused():
    unet = _unet(method="full")
    unet.conv_in.padding_mode = "reflect"  # not zero-padded: Opacus hooks compute this layer's per-example grads
    assert unfused_trainable(unet) == ["conv_in.weight", "conv_in.bias"]
    unet.enable_gradient_checkpointing()
    with pytest.raises(ConfigError, match="gradient checkpointing.*conv_in.weight"):
        _engine(unet)


def test_checkpointing_enabled_after_the_engine_is_refused_on_hooks():
    unet = _unet()
    engine = _engine(unet, grad_sample_mode="hooks")
    unet.enable_gradient_checkpointing()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        engine.step()
