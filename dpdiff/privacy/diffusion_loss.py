"""The per-example denoising loss, with noise multiplicity folded into each example's gradient.

Noise multiplicity K (DPDM) draws K (timestep, noise) pairs per image to lower the variance of
its gradient. For DP the K draws must be averaged INSIDE the example's gradient before clipping:
clipping each draw separately lets one image contribute K*C, and the reported epsilon is wrong.
Opacus sees the K draws as K batch rows, so after backward `fold_multiplicity` averages each
example's K per-row gradients into one row; only then does the optimizer clip."""

from __future__ import annotations

import torch
from torch import nn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def draw_diffusion_inputs(
    latents: torch.Tensor, multiplicity: int, num_train_timesteps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K copies of each example (rows i*K .. i*K+K-1 belong to example i), their noise and timesteps.

    Drawn on the CPU from the engine's generator, so a run is reproducible on any device."""
    rows = latents.repeat_interleave(multiplicity, dim=0)
    noise = torch.randn(rows.shape, generator=generator, dtype=torch.float32).to(rows.device, rows.dtype)
    timesteps = torch.randint(0, num_train_timesteps, (rows.shape[0],), generator=generator).to(rows.device)
    return rows, noise, timesteps


def per_row_loss(
    model: nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Denoising MSE of each row, averaged over latent elements: shape [rows]."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy, timesteps, encoder_hidden_states=encoder_hidden_states).sample
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def fold_multiplicity(params: list[nn.Parameter], num_examples: int, multiplicity: int) -> None:
    """Average the K per-row gradients of each example into one per-example gradient, in place.

    Valid with Opacus `loss_reduction="mean"` and a loss that is the mean over all rows: Opacus then
    stores each row's own gradient, and the mean over an example's K rows is the gradient of that
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
        p.grad_sample = grad_sample.reshape(num_examples, multiplicity, *grad_sample.shape[1:]).mean(dim=1)
