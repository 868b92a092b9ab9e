"""The layers dpdiff computes per-example gradients for itself, each in one custom autograd Function
whose backward returns the input gradient and writes every trained parameter's per-example gradient to
`p.grad_sample` (Opacus' conventions), never a summed `p.grad`. `grad_samplers.FusedGradSampleModule`
routes the layers' forwards here; the formulas are in its docstring."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpdiff.privacy.factored import FactoredGradSample, worth_factoring


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


def fusable_conv_reason(layer: nn.Module) -> str | None:
    """None if `_ConvPerSample` computes this convolution exactly; else why it stays on Opacus hooks."""
    if type(layer) is not nn.Conv2d:
        return "not an nn.Conv2d"
    if not any(p.requires_grad for p in layer.parameters(recurse=False)):
        return "nothing in it trains"
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return "grouped, non-zero-padded or 'same'/'valid'-padded convolution"
    return None


def fusable_conv_layers(model: nn.Module) -> list[nn.Conv2d]:
    """Plain `nn.Conv2d` (exact type, groups 1, zero padding) with a trainable weight or bias: the UNets'
    resnet and projection convolutions, patch embeddings, and the A/B factors of a peft LoRA Conv2d."""
    return [m for m in model.modules() if fusable_conv_reason(m) is None]


NORMS = (nn.LayerNorm, nn.GroupNorm)


def fusable_norm_layers(model: nn.Module) -> list[nn.Module]:
    """`nn.LayerNorm` / `nn.GroupNorm` (exact types) with a trainable affine weight or bias."""
    return [m for m in model.modules() if type(m) in NORMS and any(p.requires_grad for p in m.parameters(recurse=False))]


def fused_layers_by_kind(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """(layer, the forward that routes it through its Function) for every layer the fused mode covers."""
    return ([(m, lora_forward) for m in fusable_lora_layers(model)] + [(m, linear_forward) for m in fusable_linear_layers(model)]
            + [(m, norm_forward) for m in fusable_norm_layers(model)] + [(m, conv_forward) for m in fusable_conv_layers(model)])


def fused_layers(model: nn.Module) -> list[nn.Module]:
    return [layer for layer, _ in fused_layers_by_kind(model)]


def unfused_trainable(model: nn.Module) -> list[str]:
    """Trainable parameters that the fused mode leaves to Opacus' hooks."""
    fused = {id(p) for layer in fused_layers(model) for p in layer.parameters()}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in fused]


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[n, tokens, features] view of a [n, ..., features] tensor; explicit sizes so n = 0 works too."""
    return t.reshape(n, math.prod(t.shape[1:-1]), t.shape[-1])


def _added(current: torch.Tensor, grad_sample: torch.Tensor) -> torch.Tensor:
    if isinstance(current, FactoredGradSample) and isinstance(grad_sample, FactoredGradSample):
        return current.plus(grad_sample)  # stays factored: the two calls' tokens side by side
    return current + grad_sample  # a factored operand is materialised


def _store(p: nn.Parameter, grad_sample: torch.Tensor, pass_id: int) -> None:
    """Opacus semantics: sum within one forward pass, stack (list) across passes before zero_grad."""
    current = getattr(p, "grad_sample", None)
    if current is None:
        p.grad_sample = grad_sample
    elif getattr(p, "_fused_pass", None) == pass_id:
        if isinstance(current, list):
            current[-1] = _added(current[-1], grad_sample)
        else:
            p.grad_sample = _added(current, grad_sample)
    else:
        p.grad_sample = (current if isinstance(current, list) else [current]) + [grad_sample]
    p._fused_pass = pass_id


def _store_weight(p: nn.Parameter, g3: torch.Tensor, x3: torch.Tensor, w: float, factored: bool, pass_id: int) -> None:
    """dW_i = w * g3[i]^T x3[i] (g3: [n, T, out], x3: [n, T, in]): kept factored for book-keeping clipping
    where that is cheaper (`worth_factoring`), else materialised as [n, *p.shape]."""
    n, tokens, fan_out = g3.shape
    if factored and worth_factoring(tokens, x3.shape[2], fan_out):
        _store(p, FactoredGradSample(g3, x3, p.shape, scale=w), pass_id)
        return
    dtype = torch.bfloat16 if g3.dtype == torch.bfloat16 else torch.float32
    grad_w = torch.bmm(g3.to(dtype).transpose(1, 2), x3.to(dtype))  # [n, out, in]
    _store(p, grad_w.float().mul_(w).view(n, *p.shape), pass_id)


def patches_token_major(x: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    """[n, L, kh*kw*in]: every output position's input patch, columns in (kh, kw, in) order, contiguous.

    One strided gather from a zero-padded channels-last copy: 3-4x faster on CPU than F.unfold (whose
    [n, in*kh*kw, L] layout the token-major products then copy again)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()  # [n, h + 2ph, w + 2pw, c]
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = xp.stride()
    return xp.as_strided((n, ho, wo, kh, kw, c), (s0, s1 * sh, s2 * sw, s1 * dh, s2 * dw, s3)).reshape(n, ho * wo, kh * kw * c)


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
        g3, h3 = _rows(g.float(), n), _rows(h.float() * w, n)
        grad_b = torch.bmm(g3.transpose(1, 2), h3)  # [n, out, r]
        grad_a = torch.bmm(_rows(gh.float() * w, n).transpose(1, 2), _rows(x.float(), n))
        _store(ctx.params[0], grad_a, ctx.pass_id)
        _store(ctx.params[1], grad_b, ctx.pass_id)
        return grad_x, None, None, None, None, None  # no summed gradient for A, B: p.grad stays None


class _LinearPerSample(torch.autograd.Function):
    """W x + b; backward: grad of x only, per-example grads of W and b into `grad_sample`."""

    @staticmethod
    def forward(ctx, x, weight, bias, batch_scale, factored, pass_id):
        ctx.save_for_backward(x, weight)
        ctx.batch_scale, ctx.factored, ctx.pass_id, ctx.params = batch_scale, factored, pass_id, (weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        n = x.shape[0]
        grad_x = (g @ weight.to(g.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        # bf16 per-example products stay bf16 (the accelerator's fast path; the engine clips in fp32);
        # fp16 and fp32 are formed in fp32, so a batch-scaled fp16 gradient cannot overflow
        w = float(n) if ctx.batch_scale else 1.0
        g3 = _rows(g, n)
        weight_p, bias_p = ctx.params
        if ctx.needs_input_grad[1]:
            _store_weight(weight_p, g3, _rows(x, n), w, ctx.factored, ctx.pass_id)
        if ctx.needs_input_grad[2]:
            _store(bias_p, g3.float().sum(dim=1).mul_(w), ctx.pass_id)
        return grad_x, None, None, None, None, None


class _ConvPerSample(torch.autograd.Function):
    """conv2d(x, W) + b; backward: grad of x only (aten's convolution_backward with the weight and bias
    gradients masked off), per-example dW_i = G_i P_i^T ([out, L] @ [L, in*kh*kw], P_i = unfold(x_i); x_i itself
    for a 1x1 conv) and db_i = sum of G_i over positions. Kept factored (book-keeping), the patches are
    gathered token-major by `patches_token_major` instead, the layout the Gram and clipped-sum products read."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, batch_scale, factored, pass_id):
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.batch_scale, ctx.factored, ctx.pass_id = layer, batch_scale, factored, pass_id
        return layer._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer, n = ctx.layer, x.shape[0]
        if x.dim() != 4:
            raise RuntimeError(f"fused per-example conv gradients need a batched [N, C, H, W] input, got shape {tuple(x.shape)}")
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                g, x.to(g.dtype), weight.to(g.dtype), None, layer.stride, layer.padding, layer.dilation, False,
                [0, 0], 1, [True, False, False])[0].to(x.dtype)
        w = float(n) if ctx.batch_scale else 1.0
        g3 = g.flatten(2)  # [n, out, L]
        if ctx.needs_input_grad[1]:
            fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
            if ctx.factored and worth_factoring(g3.shape[2], fan_in, g3.shape[1]):  # token-major patches, kept factored
                factored = FactoredGradSample(g3.transpose(1, 2), patches_token_major(x, layer), layer.weight.shape, scale=w,
                                              kernel_last=True)
                _store(layer.weight, factored, ctx.pass_id)
            else:  # unfold's [n, in*kh*kw, L] is already the dense product's layout (a reorder would cost more)
                pointwise = layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)
                cols = x.flatten(2) if pointwise else F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
                _store_weight(layer.weight, g3.transpose(1, 2), cols.transpose(1, 2), w, False, ctx.pass_id)
        if ctx.needs_input_grad[2]:
            _store(layer.bias, g3.float().sum(dim=2).mul_(w), ctx.pass_id)
        return grad_x, None, None, None, None, None, None


def _normalized(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xhat, mean, rstd): the layer's normalisation without its affine part, and the statistics its
    fused backward kernel takes."""
    if type(layer) is nn.LayerNorm:
        return torch.native_layer_norm(x, layer.normalized_shape, None, None, layer.eps)
    n, c = x.shape[:2]
    return torch.native_group_norm(x, None, None, n, c, math.prod(x.shape[2:]), layer.num_groups, layer.eps)


def _normalized_input_grad(layer: nn.Module, g: torch.Tensor, x: torch.Tensor, mean, rstd) -> torch.Tensor:
    """d loss / d x of the affine norm through aten's own fused backward kernel (input gradient only)."""
    weight = layer.weight.float() if layer.weight is not None else None
    if type(layer) is nn.LayerNorm:
        return torch.ops.aten.native_layer_norm_backward(g, x, layer.normalized_shape, mean, rstd, weight, None,
                                                         [True, False, False])[0]
    n, c = x.shape[:2]
    return torch.ops.aten.native_group_norm_backward(g, x, mean, rstd, weight, n, c, math.prod(x.shape[2:]),
                                                     layer.num_groups, [True, False, False])[0]


class _NormPerSample(torch.autograd.Function):
    """LayerNorm / GroupNorm y = xhat * w + b; backward: grad of x (aten's fused norm backward on the
    recomputed statistics, in fp32), per-example grads dw_i = sum (g * xhat)_i, db_i = sum g_i over
    example i's tokens / positions."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, batch_scale, pass_id):
        ctx.save_for_backward(x)
        ctx.layer, ctx.batch_scale, ctx.pass_id = layer, batch_scale, pass_id
        return layer._dpdiff_original_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        layer, n = ctx.layer, x.shape[0]
        x32, g32 = x.float().contiguous(), g.float().contiguous()  # the aten kernels read them as laid out
        xhat, mean, rstd = _normalized(layer, x32)
        # LayerNorm's affine acts on the trailing dims; GroupNorm's on the channel dim 1
        trailing = len(layer.normalized_shape) if type(layer) is nn.LayerNorm else 0
        per_channel = (lambda t: t.reshape(n, t.shape[1], math.prod(t.shape[2:])).sum(dim=2)) if type(layer) is nn.GroupNorm else (
            lambda t: t.reshape(n, math.prod(t.shape[1:t.dim() - trailing]), *layer.normalized_shape).sum(dim=1))
        w = float(n) if ctx.batch_scale else 1.0
        if layer.weight is not None and layer.weight.requires_grad:
            _store(layer.weight, per_channel(g32 * xhat).mul_(w), ctx.pass_id)
        if layer.bias is not None and layer.bias.requires_grad:
            _store(layer.bias, per_channel(g32).mul_(w), ctx.pass_id)
        grad_x = _normalized_input_grad(layer, g32, x32, mean, rstd).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def fused_active(layer: nn.Module) -> bool:
    return layer._dpdiff_fused_owner._fused_on and layer.training and torch.is_grad_enabled()


def linear_forward(self, x):
    if not fused_active(self):
        return self._dpdiff_original_forward(x)
    wrapper = self._dpdiff_fused_owner
    return _LinearPerSample.apply(x, self.weight, self.bias, wrapper.loss_reduction == "mean", wrapper.book_keeping,
                                  wrapper._pass_id)


def norm_forward(self, x):
    if not fused_active(self):
        return self._dpdiff_original_forward(x)
    wrapper = self._dpdiff_fused_owner
    return _NormPerSample.apply(x, self.weight, self.bias, self, wrapper.loss_reduction == "mean", wrapper._pass_id)


def conv_forward(self, x):
    if not fused_active(self):
        return self._dpdiff_original_forward(x)
    wrapper = self._dpdiff_fused_owner
    return _ConvPerSample.apply(x, self.weight, self.bias, self, wrapper.loss_reduction == "mean", wrapper.book_keeping,
                                wrapper._pass_id)


def lora_forward(self, x, *args, **kwargs):
    if not fused_active(self):
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


