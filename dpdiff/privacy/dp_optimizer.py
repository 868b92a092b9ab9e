"""Opacus' flat-clipping DPOptimizer with the same arithmetic and a linear amount of Python per step.

Opacus' `DPOptimizer` re-reads `accumulated_iterations` (a loop over every parameter) once per parameter
in `scale_grad`, rebuilds the list of per-sample gradients several times, and draws the noise one
tensor at a time: on a LoRA model with ~100 small tensors that is a fixed ~50 ms a step on a CPU,
the largest part of DP's cost there (docs/benchmarks.md `## DP overhead`). This subclass computes,
per logical step, exactly what Opacus computes:

    summed = sum_i min(1, C / (||g_i|| + 1e-6)) g_i        (||g_i||: the flat norm over all parameters)
    grad   = (summed + N(0, sigma^2 C^2 I)) / expected_batch_size

with one norm pass, one product per tensor and ONE noise draw over the concatenation of all
parameters (the same i.i.d. Gaussian; `secure_mode` draws it from the OS CSPRNG instead: secure_random.py). It also
keeps the per-example norms it clipped with (`last_per_sample_norms`), so the engine's clipped-fraction
diagnostic needs no second norm pass. Skip-step accumulation, zero_grad, state_dict and the
distributed all-reduce are Opacus' unchanged."""

from __future__ import annotations

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

from dpdiff.privacy.factored import clipped_sum, sq_norms
from dpdiff.privacy.secure_random import secure_normal_


class FlatClipDPOptimizer(DPOptimizer):
    last_per_sample_norms: torch.Tensor | None = None  # of the latest clip_and_accumulate (private: diagnostics only)

    def clip_and_accumulate(self) -> None:
        grad_samples = self.grad_samples
        n = len(grad_samples[0])
        device = grad_samples[0].device
        if n == 0:
            norms = torch.zeros(0, device=device)
        else:  # factored (book-keeping) gradients give their norms without being materialised
            norms = torch.stack([sq_norms(g).to(device) for g in grad_samples], dim=1).sum(dim=1).sqrt()
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        self.last_per_sample_norms = norms.detach()
        for p, grad_sample in zip(self.params, grad_samples):
            _check_processed_flag(p.grad_sample)
            # low-precision per-sample gradients join fp32 masters; a factored one in one [out, rows] product
            grad = clipped_sum(grad_sample, factor, p)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad.add_(grad)
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        reference = params[0].summed_grad
        flat = torch.empty(sum(p.numel() for p in params), device=reference.device, dtype=reference.dtype)
        std = self.noise_multiplier * self.max_grad_norm
        if self.secure_mode:  # the OS CSPRNG, not the (seeded) torch generator: dpdiff/privacy/secure_random.py
            noise = secure_normal_(flat, std) if std > 0 else flat.zero_()
        elif std == 0:
            noise = _generate_noise(std=std, reference=flat, generator=self.generator)
        else:  # the draw torch.normal makes inside _generate_noise, without its unused zero-filled buffer
            noise = flat.normal_(0.0, std, generator=self.generator)
        with torch.no_grad():  # in-place into split views: allowed (and correct) only outside autograd
            for p, part in zip(params, noise.split([p.numel() for p in params])):
                p.grad = part.view_as(p).add_(p.summed_grad.view_as(p))  # in the noise buffer: no third P-sized tensor
                _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            divisor = self.expected_batch_size * self.accumulated_iterations  # once, not once per parameter
            torch._foreach_div_([p.grad for p in self.params], divisor)


class FlatClipDistributedDPOptimizer(DistributedDPOptimizer, FlatClipDPOptimizer):
    """Opacus' distributed flat clipping (noise on rank 0 only, then all-reduce) on the fast parts above."""


def flat_clip_optimizer_class(distributed: bool) -> type[DPOptimizer]:
    return FlatClipDistributedDPOptimizer if distributed else FlatClipDPOptimizer
