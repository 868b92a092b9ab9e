"""Per-example gradients for DP-SGD: one entry point over Opacus' modes plus dpdiff's fused layers.

`wrap_for_per_sample_grads(model, mode)` replaces `opacus.grad_sample.utils.prepare_module(model, mode,
batch_first=True, loss_reduction="mean")`. Modes "hooks", "ew", "functorch" are Opacus' own. Mode
"fused" computes the per-example gradients of four layer kinds inside a custom autograd Function:

- every plain peft LoRA Linear (y = W0 x + s * B A x, no dropout, no DoRA), in closed form:
      dB_i = s * sum_t g_t (A x_t)^T        dA_i = s * sum_t (B^T g_t) x_t^T
- every plain `nn.Linear` whose own weight/bias trains (attention blocks, full fine-tuning):
      dW_i = sum_t g_t x_t^T                db_i = sum_t g_t
- every `nn.LayerNorm` / `nn.GroupNorm` whose affine weight/bias trains (y = xhat * w + b):
      dw_i = sum_t g_t * xhat_t             db_i = sum_t g_t
- every zero-padded, ungrouped `nn.Conv2d` whose weight/bias trains (resnet and projection convolutions,
  patch embeddings, a peft LoRA Conv2d's A and B), with U_i = unfold(x_i) (x_i itself for a 1x1 conv):
      dW_i = G_i U_i^T                      db_i = sum_positions G_i

(g = output gradient, sums over example i's tokens), written to `p.grad_sample` under Opacus' conventions
(loss_reduction "mean": multiplied by the batch size, so grad_sample[i] is row i's own gradient; shape
[rows, *p.shape]; a layer called twice in one forward sums, a second forward/backward before
`zero_grad` stacks a list as Opacus does). The Functions return no gradient for their parameters, so
autograd never computes the summed weight gradient (`p.grad` stays None): the work that Opacus' hooks
add on top of plain training. Every other trainable module (a grouped convolution, an embedding, ...) gets
Opacus hooks in the same wrapper, so every trainable parameter still receives a `grad_sample`.
With `book_keeping` on (the engine's flat clipping), a Linear or conv weight whose T*(in + out) <
in*out keeps its per-example gradients factored as (G, X) (`dpdiff.privacy.factored`): clipping then
takes ghost norms and one clipped-sum product instead of a [rows, out, in] buffer.
Forward outputs and input gradients are those of the unwrapped model. The fused path runs only for
calls through the wrapper (or inside its `per_sample_pass()`, which also covers the recomputation of
gradient-checkpointed blocks during backward), in training mode, with grad enabled; the bare model is
unchanged otherwise. ("fused_lora", its earlier name, is accepted as an alias.)"""

from __future__ import annotations

import contextlib
import itertools
import types

from opacus.grad_sample import GradSampleModule, register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import prepare_module
from torch import nn

from dpdiff.privacy.fused_layers import (  # noqa: F401  (re-exported: what the fused mode covers)
    fusable_conv_layers,
    fusable_linear_layers,
    fusable_lora_layers,
    fusable_norm_layers,
    fusable_reason,
    fused_layers,
    fused_layers_by_kind,
    lora_forward,
    unfused_trainable,
)

FUSED_MODE = "fused"
MODE_ALIASES = {"fused_lora": FUSED_MODE}  # the name before plain Linear layers were fused too
OPACUS_MODES = ("hooks", "ew", "functorch")
MODES = (FUSED_MODE, *OPACUS_MODES)


class FusedGradSampleModule(GradSampleModule):
    """Opacus' hooks GradSampleModule, minus the fused layers, which use the custom Functions."""

    def __init__(self, m: nn.Module, *, batch_first=True, loss_reduction="mean", strict=True):
        if not batch_first:
            raise ValueError("the fused mode needs batch_first=True")
        by_kind = fused_layers_by_kind(m)
        object.__setattr__(self, "_fused_layers", [layer for layer, _ in by_kind])
        object.__setattr__(self, "_skip", {id(x) for layer in self._fused_layers for x in layer.modules()})
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict)
        self._fused_on, self._pass_counter, self._pass_id = False, itertools.count(), -1
        # True: Linear/conv weight gradients may be left factored (dpdiff.privacy.factored) where that is
        # cheaper; the engine turns it on for flat clipping, whose optimizer uses the factored fast paths
        self.book_keeping = False
        for layer, forward in by_kind:  # plain attributes: the wrapper must not become a submodule
            object.__setattr__(layer, "_dpdiff_original_forward", layer.forward)
            object.__setattr__(layer, "_dpdiff_fused_owner", self)
            if forward is lora_forward:
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
