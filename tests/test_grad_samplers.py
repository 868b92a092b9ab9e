"""The fused per-example gradients (mode fused: LoRA in closed form, plain Linear) against a one-example-at-a-time loop of
plain autograd, on a tiny diffusers UNet with peft LoRA and on a plain Sequential; through Opacus' DPOptimizer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from opacus.optimizers import DPOptimizer
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from dpdiff.adapters import prepare_trainable
from dpdiff.pipelines.preset import build_tiny_unet
from dpdiff.privacy.diffusion_loss import fold_multiplicity
from dpdiff.privacy.engine_checks import resolve_grad_sample_mode
from dpdiff.privacy.grad_samplers import (
    FUSED_MODE,
    fusable_conv_layers,
    fusable_linear_layers,
    fusable_lora_layers,
    fusable_norm_layers,
    wrap_for_per_sample_grads,
)

# Linear attention/FF LoRA (closed form), 1x1-conv proj_in/proj_out LoRA (its A/B factors as fused convs) and
# the resnets' time_emb_proj LoRA on a 2-D [B, D] input
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]


def _randomise_lora_b(model, seed=0):
    """peft initialises B = 0, which makes every A gradient zero: give B values so both are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _unet(targets=UNET_TARGETS):
    unet = build_tiny_unet(seed=0)
    prepare_trainable(unet, "lora", rank=4, lora_alpha=8, target_modules=targets)
    _randomise_lora_b(unet)
    return unet


def _unet_inputs(rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 8, 8, generator=g), torch.randint(0, 1000, (rows,), generator=g),
            torch.randn(rows, 8, 64, generator=g), torch.randn(rows, 4, 8, 8, generator=g))


def _unet_losses(model, x, t, ehs, target):
    return ((model(x, t, encoder_hidden_states=ehs).sample - target) ** 2).mean(dim=(1, 2, 3))


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _loop_grads(model, loss_fn, examples):
    """Per-example gradients by plain autograd, one example (all of its rows) at a time."""
    grads = {n: [] for n in _trainable(model)}
    for example in examples:
        model.zero_grad(set_to_none=True)
        loss_fn(model, *example).mean().backward()
        for n, p in _trainable(model).items():
            grads[n].append(p.grad.clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in grads.items()}


ATOL = 1e-6  # relative to the largest entry


def _close(actual, expected, atol=None):
    scale = max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=(atol or ATOL) * scale)


def _backward(wrapped, loss_fn, inputs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        losses = loss_fn(wrapped, *inputs)
        losses.mean().backward()
    return losses


def _mse_losses(m, x, target):
    return ((m(x) - target) ** 2).flatten(1).mean(dim=1)


def _fused_matches_loop(model, losses, x, target):
    """The fused wrapper's per-example gradients equal the one-example loop's and its input gradient the bare
    model's; returns the wrapper (its grad_samples still set)."""
    expected = _loop_grads(model, losses, [(x[i:i + 1], target[i:i + 1]) for i in range(len(x))])
    xr = x.clone().requires_grad_()
    losses(model, xr, target).mean().backward()
    model.zero_grad(set_to_none=True)
    wrapped = wrap_for_per_sample_grads(model, FUSED_MODE)
    xf = x.clone().requires_grad_()
    _backward(wrapped, losses, (xf, target))
    _close(xf.grad, xr.grad)
    for name, p in _trainable(model).items():
        _close(p.grad_sample, expected[name])
    return wrapped


def _fused_lora_params(model):
    return [p for layer in fusable_lora_layers(model) for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("batch,k", [(1, 1), (3, 2)])  # batch 3 unfolded: the Sequential tests
def test_unet_fused_matches_loop(batch, k):
    unet = _unet()
    assert resolve_grad_sample_mode(unet, "auto") == FUSED_MODE
    x, t, ehs, target = _unet_inputs(batch * k)
    examples = [tuple(v[i * k:(i + 1) * k] for v in (x, t, ehs, target)) for i in range(batch)]
    expected = _loop_grads(unet, _unet_losses, examples)

    # the bare model on the whole batch: outputs and input gradients the wrapped model must reproduce
    xr, er = x.clone().requires_grad_(), ehs.clone().requires_grad_()
    bare_losses = _unet_losses(unet, xr, t, er, target)
    bare_losses.mean().backward()
    unet.zero_grad(set_to_none=True)

    fused = _fused_lora_params(unet)
    assert len(fusable_lora_layers(unet)) > 40 and fused
    wrapped = wrap_for_per_sample_grads(unet, FUSED_MODE)
    xf, ef = x.clone().requires_grad_(), ehs.clone().requires_grad_()
    losses = _backward(wrapped, _unet_losses, (xf, t, ef, target))
    torch.testing.assert_close(losses, bare_losses, rtol=0, atol=0)
    _close(xf.grad, xr.grad)
    _close(ef.grad, er.grad)
    params = list(_trainable(unet).values())
    fold_multiplicity(params, batch, k)
    for name, p in _trainable(unet).items():
        assert p.grad_sample.shape == (batch, *p.shape), name
        # a batch-of-1 UNet rounds differently in fp32: Opacus' hooks deviate from this loop by the same
        # 6e-6 of the max as fused_lora (measured); the Sequential tests below hold to 1e-6
        _close(p.grad_sample, expected[name], atol=1e-5)
    assert all(p.grad is None for p in params)  # the saving: autograd never summed a weight gradient
    wrapped._close()


def test_unet_bare_model_unchanged_and_auto_picks_fused():
    unet = _unet(["to_q", "to_k", "to_v", "to_out.0"])
    assert resolve_grad_sample_mode(unet, "auto") == FUSED_MODE
    wrapped = wrap_for_per_sample_grads(unet, FUSED_MODE)
    x, t, ehs, target = _unet_inputs(2)
    _unet_losses(unet, x, t, ehs, target).mean().backward()  # the bare model, not the wrapper: plain autograd
    assert all(p.grad is not None and getattr(p, "grad_sample", None) is None for p in _trainable(unet).values())
    unet.zero_grad(set_to_none=True)
    wrapped.eval()  # eval mode: no per-sample path (as Opacus' hooks), ordinary autograd
    _unet_losses(wrapped, x, t, ehs, target).mean().backward()
    assert all(p.grad is not None for p in _trainable(unet).values())
    wrapped._close()
    assert all("forward" not in layer.__dict__ for layer in fusable_lora_layers(unet))


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 12), nn.LayerNorm(12), nn.Linear(12, 5))

    def forward(self, x):
        return self.net(x)


def _seq(dropout=0.0):
    torch.manual_seed(0)
    model = _Seq()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=6, lora_dropout=dropout, target_modules=["net.0", "net.2"]), model)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name or name.startswith("net.3") or name.startswith("net.4"):
            p.requires_grad_(True)  # a trained LayerNorm and Linear: Opacus hooks inside the same wrapper
    _randomise_lora_b(model)
    return model


def _seq_losses(model, x, target):
    return ((model(x) - target) ** 2).mean(dim=(1, 2))


@pytest.mark.parametrize("mode", [FUSED_MODE, "hooks", "ew"])
def test_sequential_tokens_matches_loop(mode):
    model = _seq()
    assert isinstance(model.net[0], LoraLinear) and len(fusable_lora_layers(model)) == 2
    g = torch.Generator().manual_seed(2)
    x, target = torch.randn(4, 7, 16, generator=g), torch.randn(4, 7, 5, generator=g)
    expected = _loop_grads(model, _seq_losses, [(x[i:i + 1], target[i:i + 1]) for i in range(4)])
    xr = x.clone().requires_grad_()
    bare = model(xr)
    bare.backward(torch.ones_like(bare))
    model.zero_grad(set_to_none=True)
    wrapped = wrap_for_per_sample_grads(model, mode)
    xf = x.clone().requires_grad_()
    out = wrapped(xf)
    torch.testing.assert_close(out, bare, rtol=0, atol=0)
    out.backward(torch.ones_like(out) / (out.shape[0]))  # a mean-over-rows loss
    _close(xf.grad * out.shape[0], xr.grad)
    for p in model.parameters():
        p.grad_sample = None
    model.zero_grad(set_to_none=True)
    _backward(wrapped, _seq_losses, (x, target))
    for name, p in _trainable(model).items():
        _close(p.grad_sample, expected[name])
    if mode == FUSED_MODE:
        assert all(p.grad is None for p in _fused_lora_params(model))


def test_dropout_lora_fuses_its_factors_as_plain_linear():
    model = _seq(dropout=0.1)
    # no closed form under dropout; its A and B (plain Linear on the dropped-out input) are fused one by one
    assert fusable_lora_layers(model) == [] and resolve_grad_sample_mode(model, "auto") == FUSED_MODE
    lora_factors = [model.net[i].lora_A["default"] for i in (0, 2)] + [model.net[i].lora_B["default"] for i in (0, 2)]
    assert set(map(id, fusable_linear_layers(model))) == set(map(id, [*lora_factors, model.net[4]]))
    wrapped = wrap_for_per_sample_grads(model, FUSED_MODE)
    wrapped.eval()  # dropout off, so the loop is comparable; eval also disables hooks: just check it runs
    wrapped.train()
    x = torch.randn(3, 5, 16)
    _backward(wrapped, _seq_losses, (x, torch.zeros(3, 5, 5)))
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 3 for p in _trainable(model).values())


def test_dp_optimizer_clips_fused_grads_like_by_hand():
    model = _seq()
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(5, 6, 16, generator=g), torch.randn(5, 6, 5, generator=g)
    expected = _loop_grads(model, _seq_losses, [(x[i:i + 1], target[i:i + 1]) for i in range(5)])
    names = list(_trainable(model))
    norms = torch.stack([expected[n].flatten(1).norm(dim=1) for n in names], dim=1).norm(dim=1)
    clip = 0.05
    assert bool((norms > clip).all())  # every example is clipped
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    by_hand = {n: torch.einsum("i,i...->...", factor, expected[n]) / 5 for n in names}

    wrapped = wrap_for_per_sample_grads(model, FUSED_MODE)
    params = list(_trainable(model).values())
    before = [p.detach().clone() for p in params]
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=5, loss_reduction="mean")
    optimizer.zero_grad(set_to_none=True)
    _backward(wrapped, _seq_losses, (x, target))
    optimizer.step()
    for name, p, old in zip(names, params, before):
        _close(p.grad, by_hand[name])
        torch.testing.assert_close(p.detach(), old - by_hand[name], rtol=1e-6, atol=1e-7)  # lr 1: p -= grad


def test_second_pass_stacks_like_opacus():
    """Two forward/backward passes before zero_grad: a list of two [rows, ...] tensors, as Opacus' hooks leave."""
    model = _seq()
    wrapped = wrap_for_per_sample_grads(model, FUSED_MODE)
    x = torch.randn(2, 3, 16)
    for _ in range(2):
        _backward(wrapped, _seq_losses, (x, torch.zeros(2, 3, 5)))
    for p in _trainable(model).values():
        assert isinstance(p.grad_sample, list) and len(p.grad_sample) == 2
        _close(p.grad_sample[1], p.grad_sample[0])


def test_unknown_mode_refused():
    with pytest.raises(ValueError, match="fused"):
        wrap_for_per_sample_grads(_seq(), "ghost")


@pytest.mark.parametrize("groups, mode", [(1, "hooks"), (4, "hooks"), (1, FUSED_MODE)])
def test_conv_per_example_gradients_hold_on_a_permuted_non_contiguous_input(groups, mode):
    """Opacus' own conv rule reads a permuted input as if it were contiguous (wrong per-example
    gradients, silently); dpdiff registers a rule that makes it contiguous first."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    reference = copy.deepcopy(conv)

    class TokensToImage(nn.Module):  # what Sana's GLUMBConv feed-forward does to its token input
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x.unflatten(1, (4, 4)).permute(0, 3, 1, 2))

    wrapped = wrap_for_per_sample_grads(TokensToImage(conv), mode)
    x = torch.randn(3, 16, 8)
    wrapped(x).pow(2).sum().backward()
    plain = TokensToImage(reference)
    for i in range(3):
        reference.zero_grad()
        plain(x[i : i + 1]).pow(2).sum().backward()
        torch.testing.assert_close(conv.weight.grad_sample[i] / 3, reference.weight.grad, rtol=1e-4, atol=1e-5)


class _Convs(nn.Module):
    """3x3 padded, strided, 1x1 (no unfold), dilated non-square without bias, and a frozen one in between."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.frozen, self.c = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False), nn.Conv2d(8, 4, 1)
        self.d = nn.Conv2d(4, 4, (3, 1), padding=(2, 0), dilation=(2, 1), bias=False)

    def forward(self, x):
        for layer in (self.a, self.b, self.frozen, self.c):
            x = torch.tanh(layer(x))
        return self.d(x)


def test_conv_layers_fused_match_loop():
    torch.manual_seed(0)
    model = _Convs()
    assert fusable_conv_layers(model) == [model.a, model.b, model.c, model.d]
    g = torch.Generator().manual_seed(4)
    x, target = torch.randn(4, 3, 9, 9, generator=g), torch.randn(4, 4, 5, 5, generator=g)

    wrapped = _fused_matches_loop(model, _mse_losses, x, target)
    assert all(p.grad is None for p in _trainable(model).values())
    wrapped._close()


@pytest.mark.parametrize("build, shape", [(_Convs, (0, 3, 9, 9)), (lambda: _ConvNorm(), (0, 3, 5, 5)), (lambda: _plain_seq(), (0, 2, 16))])
def test_an_empty_batch_gives_empty_per_example_gradients(build, shape):
    model = build()
    wrapped = wrap_for_per_sample_grads(model, FUSED_MODE)
    _backward(wrapped, lambda m, x: m(x).flatten(1).sum(dim=1), (torch.zeros(shape, requires_grad=True),))
    assert all(p.grad_sample.shape == (0, *p.shape) for p in _trainable(model).values())


def test_grouped_conv_stays_on_hooks():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding_mode="reflect", padding=1))
    assert fusable_conv_layers(model) == [] and resolve_grad_sample_mode(model, "auto") == "hooks"


def _plain_seq():
    """Plain trained Linear layers (fused) and a trained LayerNorm (Opacus hooks in the same wrapper)."""
    torch.manual_seed(0)
    return _Seq()


@pytest.mark.parametrize("tokens", [None, 7])  # [B, D] and [B, T, D] inputs
def test_plain_linear_fused_matches_loop(tokens):
    model = _plain_seq()
    assert len(fusable_linear_layers(model)) == 3 and resolve_grad_sample_mode(model, "auto") == FUSED_MODE
    g = torch.Generator().manual_seed(4)
    shape = (4, 16) if tokens is None else (4, tokens, 16)
    x, target = torch.randn(*shape, generator=g), torch.randn(*shape[:-1], 5, generator=g)

    wrapped = _fused_matches_loop(model, _mse_losses, x, target)
    linear = [p for layer in fusable_linear_layers(model) for p in layer.parameters()]
    assert linear and all(p.grad is None for p in linear)  # no summed weight gradient was computed
    wrapped._close()
    assert all("forward" not in layer.__dict__ for layer in fusable_linear_layers(model))


def test_partly_trained_linear_gets_only_its_trained_grad_sample():
    model = _plain_seq()
    model.net[0].weight.requires_grad_(False)  # bias only
    wrapped = wrap_for_per_sample_grads(model, FUSED_MODE)
    _backward(wrapped, lambda m, x: m(x).pow(2).mean(dim=(1, 2)), (torch.randn(3, 2, 16),))
    assert getattr(model.net[0].weight, "grad_sample", None) is None and model.net[0].weight.grad is None
    assert model.net[0].bias.grad_sample.shape == (3, 32)


class _ConvNorm(nn.Module):
    """A frozen conv, a trained GroupNorm on [B, C, H, W], a trained LayerNorm on the tokens."""

    def __init__(self):
        super().__init__()
        self.conv, self.group, self.layer = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.LayerNorm(8)
        self.conv.requires_grad_(False)

    def forward(self, x):
        h = self.group(self.conv(x))
        return self.layer(h.flatten(2).transpose(1, 2))


def test_norm_layers_fused_match_loop():
    torch.manual_seed(0)
    model = _ConvNorm()
    with torch.no_grad():  # away from the identity init so that the weights matter
        for p in (model.group.weight, model.layer.weight):
            p.add_(torch.randn_like(p))
    assert {type(m) for m in fusable_norm_layers(model)} == {nn.GroupNorm, nn.LayerNorm}
    g = torch.Generator().manual_seed(4)
    x, target = torch.randn(3, 3, 5, 5, generator=g), torch.randn(3, 25, 8, generator=g)

    def losses(m, x, target):
        return ((m(x) - target) ** 2 * torch.arange(1, 9.0)).mean(dim=(1, 2))

    _fused_matches_loop(model, losses, x, target)
    assert all(p.grad is None for p in _trainable(model).values())
