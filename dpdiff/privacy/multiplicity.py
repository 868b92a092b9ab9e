"""Noise multiplicity inside the DP step: K draws per example, averaged INSIDE its gradient.

Noise multiplicity K (DPDM) draws K (timestep, noise) pairs per image to lower the variance of its
gradient. For DP the K draws must be averaged inside the example's gradient before clipping: clipping
each draw separately lets one image contribute K*C, and the reported epsilon is wrong. Opacus sees the
K draws as K batch rows, so after backward `fold_multiplicity` averages each example's K per-row
gradients into one row; only then does the optimizer clip."""

from __future__ import annotations

from torch import nn

from dpdiff.privacy.factored import folded


def fold_multiplicity(params: list[nn.Parameter], num_examples: int, multiplicity: int) -> None:
    """Average the K per-row gradients of each example into one per-example gradient, in place.

    Valid when `p.grad_sample` holds each row's own gradient (the engine's summed loss with Opacus
    `loss_reduction="sum"`): the mean over an example's K rows is then the gradient of that
    example's K-averaged loss."""
    if multiplicity == 1:
        return
    for p in params:
        grad_sample = p.grad_sample
        if grad_sample is None:
            continue
        if isinstance(grad_sample, list):
            raise RuntimeError("per-sample gradients were accumulated over several backward passes before folding")
        if grad_sample.shape[0] != num_examples * multiplicity:
            raise RuntimeError(
                f"per-sample gradient of shape {tuple(grad_sample.shape)} does not have "
                f"{num_examples}x{multiplicity} rows; cannot fold the noise multiplicity"
            )
        p.grad_sample = folded(grad_sample, num_examples, multiplicity)
