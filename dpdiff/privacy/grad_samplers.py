"""Per-example gradients for DP-SGD: one entry point over Opacus' modes plus dpdiff's fused layers.

`wrap_for_per_sample_grads(model, mode)` replaces `opacus.grad_sample.utils.prepare_module(model, mode,
batch_first=True, loss_reduction="mean")`. Modes "hooks", "ew", "functorch" are Opacus' own. Mode
"fused" computes the per-example gradients of two layer kinds inside a custom autograd Function:

- every plain peft LoRA Linear (y = W0 x + s * B A x, no dropout, no DoRA), in closed form:
      dB_i = s * sum_t g_t (A x_t)^T        dA_i = s * sum_t (B^T g_t) x_t^T
- every plain `nn.Linear` whose own weight/bias trains (attention blocks, full fine-tuning):
      dW_i = sum_t g_t x_t^T                db_i = sum_t g_t

(g = output gradient, sums over example i's tokens), written to `p.grad_sample` under Opacus' conventions
(loss_reduction "mean": multiplied by the batch size, so grad_sample[i] is row i's own gradient; shape
[rows, *p.shape]; a layer called twice in one forward sums, a second forward/backward before
`zero_grad` stacks a list as Opacus does). The Functions return no gradient for their parameters, so
autograd never computes the summed weight gradient (`p.grad` stays None): the work that Opacus' hooks
add on top of plain training. Every other trainable module (a norm, a convolution, a Conv LoRA, ...) gets
Opacus hooks in the same wrapper, so every trainable parameter still receives a `grad_sample`.
Forward outputs and input gradients are those of the unwrapped model. The fused path runs only for
calls through the wrapper (or inside its `per_sample_pass()`, which also covers the recomputation of
gradient-checkpointed blocks during backward), in training mode, with grad enabled; the bare model is
unchanged otherwise. ("fused_lora", its earlier name, is accepted as an alias.)"""

from __future__ import annotations

import contextlib
import itertools
import types

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule, register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import prepare_module
from torch import nn

FUSED_MODE = "fused"
MODE_ALIASES = {"fused_lora": FUSED_MODE}  # the name before plain Linear layers were fused too
OPACUS_MODES = ("hooks", "ew", "functorch")
MODES = (FUSED_MODE, *OPACUS_MODES)


def _peft_lora_linear():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft absent: no LoRA layers to fuse
        return None
    return Linear


def fusable_reason(layer: nn.Module) -> str | None:
    """None if the closed-form path computes this peft LoRA Linear exactly; else why it cannot."""
    lora_linear = _peft_lora_linear()
    if lora_linear is None or not isinstance(layer, lora_linear):
        return "not a peft LoRA Linear"
    if not isinstance(layer.get_base_layer(), nn.Linear) or getattr(layer, "fan_in_fan_out", False):
        return "base layer is not an nn.Linear"
    if any(p.requires_grad for p in layer.get_base_layer().parameters()):
        return "its base layer trains"
    if list(layer.lora_A.keys()) != list(layer.active_adapters) or len(layer.lora_A) != 1:
        return "not exactly one active adapter"
    name = layer.active_adapters[0]
    a, b = layer.lora_A[name], layer.lora_B[name]
    if getattr(layer, "lora_variant", {}).get(name) is not None or layer.use_dora.get(name, False):
        return "DoRA / LoRA variant"
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout) and dropout.p == 0):
        return "lora_dropout > 0"
    if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)) or a.bias is not None or b.bias is not None:
        return "LoRA A/B with bias"
    if [id(p) for p in layer.parameters() if p.requires_grad] != [id(a.weight), id(b.weight)]:
        return "trainable parameters other than (or fewer than) the active A and B"
    if layer.merged or layer.disable_adapters:
        return "adapter merged or disabled"
    return None


def fusable_lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if fusable_reason(m) is None]


def fusable_linear_layers(model: nn.Module) -> list[nn.Linear]:
    """Plain `nn.Linear` layers (exact type) with a trainable weight or bias, outside the fused LoRA layers."""
    inside_lora = {id(x) for layer in fusable_lora_layers(model) for x in layer.modules()}
    return [m for m in model.modules() if type(m) is nn.Linear and id(m) not in inside_lora
            and any(p.requires_grad for p in m.parameters(recurse=False))]


def fused_layers(model: nn.Module) -> list[nn.Module]:
    return fusable_lora_layers(model) + fusable_linear_layers(model)


def unfused_trainable(model: nn.Module) -> list[str]:
    """Trainable parameters that the fused mode leaves to Opacus' hooks."""
    fused = {id(p) for layer in fused_layers(model) for p in layer.parameters()}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in fused]


def _store(p: nn.Parameter, grad_sample: torch.Tensor, pass_id: int) -> None:
    """Opacus semantics: sum within one forward pass, stack (list) across passes before zero_grad."""
    current = getattr(p, "grad_sample", None)
    if current is None:
        p.grad_sample = grad_sample
    elif getattr(p, "_fused_pass", None) == pass_id:
        if isinstance(current, list):
            current[-1] = current[-1] + grad_sample
        else:
            p.grad_sample = current + grad_sample
    else:
        p.grad_sample = (current if isinstance(current, list) else [current]) + [grad_sample]
    p._fused_pass = pass_id


class _LoraPerSample(torch.autograd.Function):
    """s * B(A x); backward: grad of x only, per-example grads of A and B into `grad_sample`."""

    @staticmethod
    def forward(ctx, x, a, b, scaling, batch_scale, pass_id):
        h = F.linear(x, a)
        ctx.save_for_backward(x, h, a, b)
        ctx.scaling, ctx.batch_scale, ctx.pass_id, ctx.params = scaling, batch_scale, pass_id, (a, b)
        return F.linear(h, b) * scaling

    @staticmethod
    def backward(ctx, g):
        x, h, a, b = ctx.saved_tensors
        s, n = ctx.scaling, x.shape[0]
        # under autocast the forward ran in bf16/fp16 while A, B are fp32 masters: the input gradient
        # goes back in the forward's dtype, the per-example gradients are formed in fp32
        gh = g @ b.to(g.dtype)  # [n, ..., r]: B^T g_t
        grad_x = ((gh * s) @ a.to(gh.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        w = s * (n if ctx.batch_scale else 1)  # "mean": row i's own gradient, as Opacus stores it
        g3, h3 = g.float().reshape(n, -1, g.shape[-1]), (h.float() * w).reshape(n, -1, h.shape[-1])
        grad_b = torch.bmm(g3.transpose(1, 2), h3)  # [n, out, r]
        grad_a = torch.bmm((gh.float() * w).reshape(n, -1, gh.shape[-1]).transpose(1, 2),
                           x.float().reshape(n, -1, x.shape[-1]))
        _store(ctx.params[0], grad_a, ctx.pass_id)
        _store(ctx.params[1], grad_b, ctx.pass_id)
        return grad_x, None, None, None, None, None  # no summed gradient for A, B: p.grad stays None


class _LinearPerSample(torch.autograd.Function):
    """W x + b; backward: grad of x only, per-example grads of W and b into `grad_sample`."""

    @staticmethod
    def forward(ctx, x, weight, bias, batch_scale, pass_id):
        ctx.save_for_backward(x, weight)
        ctx.batch_scale, ctx.pass_id, ctx.params = batch_scale, pass_id, (weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        n = x.shape[0]
        grad_x = (g @ weight.to(g.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        # bf16 per-example products stay bf16 (the accelerator's fast path; the engine clips in fp32);
        # fp16 and fp32 are formed in fp32, so a batch-scaled fp16 gradient cannot overflow
        dtype = torch.bfloat16 if g.dtype == torch.bfloat16 else torch.float32
        w = float(n) if ctx.batch_scale else 1.0
        g3 = g.reshape(n, -1, g.shape[-1]).to(dtype)
        weight_p, bias_p = ctx.params
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(g3.transpose(1, 2), x.reshape(n, -1, x.shape[-1]).to(dtype))  # [n, out, in]
            _store(weight_p, grad_w.float().mul_(w), ctx.pass_id)
        if ctx.needs_input_grad[2]:
            _store(bias_p, g3.float().sum(dim=1).mul_(w), ctx.pass_id)
        return grad_x, None, None, None, None


def _fused_active(layer: nn.Module) -> bool:
    return layer._dpdiff_fused_owner._fused_on and layer.training and torch.is_grad_enabled()


def _linear_forward(self, x):
    if not _fused_active(self):
        return self._dpdiff_original_forward(x)
    wrapper = self._dpdiff_fused_owner
    return _LinearPerSample.apply(x, self.weight, self.bias, wrapper.loss_reduction == "mean", wrapper._pass_id)


def _fused_forward(self, x, *args, **kwargs):
    if not _fused_active(self):
        return self._dpdiff_original_forward(x, *args, **kwargs)
    wrapper = self._dpdiff_fused_owner
    # the full `fusable_reason` ran at wrapping; per call only what a user can toggle later (cheap)
    name = self._dpdiff_adapter
    if args or kwargs or self.merged or self.disable_adapters or list(self.active_adapters) != [name]:
        raise RuntimeError("LoRA layer changed after wrapping for per-sample gradients (merged, disabled, another "
                           "adapter or extra arguments); wrap the model again")
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    result = self.base_layer(x)
    lora = _LoraPerSample.apply(self._cast_input_dtype(x, a.dtype), a, b, float(self.scaling[name]),
                                wrapper.loss_reduction == "mean", wrapper._pass_id)
    return (result + lora).to(result.dtype)


class FusedGradSampleModule(GradSampleModule):
    """Opacus' hooks GradSampleModule, minus the fused layers, which use the custom Functions."""

    def __init__(self, m: nn.Module, *, batch_first=True, loss_reduction="mean", strict=True):
        if not batch_first:
            raise ValueError("the fused mode needs batch_first=True")
        lora, linear = fusable_lora_layers(m), fusable_linear_layers(m)
        object.__setattr__(self, "_fused_layers", lora + linear)
        object.__setattr__(self, "_skip", {id(x) for layer in self._fused_layers for x in layer.modules()})
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict)
        self._fused_on, self._pass_counter, self._pass_id = False, itertools.count(), -1
        for layer, forward in [(x, _fused_forward) for x in lora] + [(x, _linear_forward) for x in linear]:
            # plain attributes: the wrapper must not become a submodule
            object.__setattr__(layer, "_dpdiff_original_forward", layer.forward)
            object.__setattr__(layer, "_dpdiff_fused_owner", self)
            if forward is _fused_forward:
                object.__setattr__(layer, "_dpdiff_adapter", layer.active_adapters[0])
            object.__setattr__(layer, "forward", types.MethodType(forward, layer))

    def iterate_submodules(self, module: nn.Module):
        if id(module) in self._skip:
            return
        yield from super().iterate_submodules(module)

    @contextlib.contextmanager
    def per_sample_pass(self):
        """Keep the fused path on from forward through backward: a gradient-checkpointed block recomputes
        its forward during backward, and that recomputation must save what the fused Functions saved."""
        previous, self._fused_on = self._fused_on, True
        try:
            yield
        finally:
            self._fused_on = previous

    def forward(self, *args, **kwargs):
        self._pass_id = next(self._pass_counter)
        with self.per_sample_pass():
            return self._module(*args, **kwargs)

    def _close(self):
        for layer in self._fused_layers:
            for key in ("forward", "_dpdiff_original_forward", "_dpdiff_fused_owner", "_dpdiff_adapter"):
                layer.__dict__.pop(key, None)
        for p in self._module.parameters():
            if hasattr(p, "_fused_pass"):
                del p._fused_pass
        super()._close()


FusedLoraGradSampleModule = FusedGradSampleModule  # the earlier name


def wrap_for_per_sample_grads(model: nn.Module, mode: str, *, loss_reduction: str = "mean") -> nn.Module:
    """The module to run forward/backward through; afterwards each trainable `p.grad_sample` is [rows, *p.shape]."""
    mode = MODE_ALIASES.get(mode, mode)
    if mode == FUSED_MODE:
        return FusedGradSampleModule(model, batch_first=True, loss_reduction=loss_reduction)
    if mode in OPACUS_MODES:
        return prepare_module(model, mode, batch_first=True, loss_reduction=loss_reduction)
    raise ValueError(f"unknown per-sample gradient mode {mode!r}; choose one of {list(MODES)}")


@register_grad_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def contiguous_conv_grad_sample(layer, activations, backprops):
    """Opacus' conv grad sampler on contiguous activations.

    Its `unfold2d` reads the input with `as_strided` as if it were contiguous: a permuted input (Sana's
    GLUMBConv feed-forward gets [B, T, C] tokens unflattened and permuted to [B, C, H, W]) silently
    gives wrong per-example gradients (tests/test_grad_samplers.py shows it). Copying is cheap beside
    the unfold itself."""
    return compute_conv_grad_sample(layer, [a.contiguous() for a in activations], backprops)
