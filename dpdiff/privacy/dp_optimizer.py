"""Opacus' flat-clipping DPOptimizer with the same arithmetic and a linear amount of Python per step.

Opacus' `DPOptimizer` re-reads `accumulated_iterations` (a loop over every parameter) once per parameter
in `scale_grad`, rebuilds the list of per-sample gradients several times, and draws the noise one
tensor at a time: on a LoRA model with ~100 small tensors that is a fixed ~50 ms a step on a CPU,
the largest part of DP's cost there (docs/benchmarks.md `## DP overhead`). This subclass computes,
per logical step, exactly what Opacus computes:

    summed = sum_i min(1, C / (||g_i|| + 1e-6)) g_i        (||g_i||: the flat norm over all parameters)
    grad   = (summed + N(0, sigma^2 C^2 I)) / expected_batch_size

with one norm pass, one product per tensor and the noise drawn in place into the clipped sums, tensor by tensor
in Opacus' order (the same values; `secure_mode` draws it from the OS CSPRNG instead: secure_random.py). It also
keeps the per-example norms it clipped with (`last_per_sample_norms`), so the engine's clipped-fraction
diagnostic needs no second norm pass. Skip-step accumulation, zero_grad, state_dict and the
distributed all-reduce are Opacus' unchanged."""

from __future__ import annotations

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

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
        """Noise drawn tensor by tensor INTO the clipped sums, which then become the gradients: Opacus' draw (same
        generator, same order, same values) without its second parameter-sized tensor. At real size that copy was
        the optimizer step's peak (one fp32 copy of every trained weight: ~1 GiB for SD-1.5's attention blocks)."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:  # the sums hold no graph: in-place is safe without no_grad (whose views scale_grad could not modify)
            _check_processed_flag(p.summed_grad)
            grad = p.summed_grad
            if std > 0:  # at most one tensor's worth of scratch at a time
                noise = torch.empty_like(grad)
                if self.secure_mode:  # the OS CSPRNG, not the seeded generator: dpdiff/privacy/secure_random.py
                    secure_normal_(noise, std)
                else:
                    noise.normal_(0.0, std, generator=self.generator)
                grad.add_(noise)
                del noise
            p.grad = grad if grad.shape == p.shape else grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            divisor = self.expected_batch_size * self.accumulated_iterations  # once, not once per parameter
            torch._foreach_div_([p.grad for p in self.params], divisor)


class FlatClipDistributedDPOptimizer(DistributedDPOptimizer, FlatClipDPOptimizer):
    """Opacus' distributed flat clipping (noise on rank 0 only, then all-reduce) on the fast parts above."""


def flat_clip_optimizer_class(distributed: bool) -> type[DPOptimizer]:
    return FlatClipDistributedDPOptimizer if distributed else FlatClipDPOptimizer
