"""The per-example denoising loss and its public draws (noise, timesteps), keyed per example.

Noise multiplicity K (DPDM) draws K (timestep, noise) pairs per image to lower the variance of
its gradient; the engine averages an example's K rows inside its gradient before clipping
(`dpdiff.privacy.multiplicity`). Model knowledge, below the DP mechanism: imports nothing of it."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")


def timestep_weights(
    num_train_timesteps: int,
    strategy: str = "none",
    multiplier: float = 1.0,
    portion: float = 0.25,
    begin: int = 0,
    end: int | None = None,
) -> torch.Tensor | None:
    """Sampling weights over the training timesteps, as the diffusers `--timestep_bias_*` flags define
    them (`later`: the last `portion` of the timesteps, the noisiest, are drawn `multiplier` times as
    often); None for uniform draws.

    Under DP-SGD this is a lever where loss weighting (min-SNR and the like) is not: clipping rescales
    every example gradient above C (nearly all of them) to norm C, undoing its weight, while drawing
    some noise levels more often changes which directions the clipped gradients point in. The draw is public
    randomness inside each example's loss; it does not touch the guarantee."""
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise ValueError(f"timestep_bias_strategy {strategy!r}: expected one of {TIMESTEP_BIAS_STRATEGIES}")
    if strategy == "none":
        return None
    if not multiplier > 0:
        raise ValueError(f"timestep_bias_multiplier must be > 0, got {multiplier} (use the 'range' strategy to leave timesteps out)")
    weights = torch.ones(num_train_timesteps, dtype=torch.float64)
    if strategy == "range":
        end = num_train_timesteps if end is None else end
        if not 0 <= begin < end <= num_train_timesteps:
            raise ValueError(f"timestep_bias_begin/end: the range [{begin}, {end}) must lie inside [0, {num_train_timesteps})")
        biased = slice(begin, end)
    else:
        if not 0 < portion <= 1:
            raise ValueError(f"timestep_bias_portion must be in (0, 1], got {portion}")
        count = max(1, int(round(portion * num_train_timesteps)))
        biased = slice(num_train_timesteps - count, None) if strategy == "later" else slice(0, count)
    weights[biased] *= multiplier
    return weights / weights.sum()


def example_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of one example's draws at one step: keyed by (seed, step, example), so the draws
    do not depend on micro-batching, on how examples are sharded over ranks, or on their order."""
    key = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(key) & ((1 << 63) - 1))


def draw_diffusion_inputs(
    latents: torch.Tensor,
    multiplicity: int,
    num_train_timesteps: int,
    generators: list[torch.Generator],
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K copies of each example (rows i*K .. i*K+K-1 belong to example i), their noise and timesteps
    (uniform, or drawn with `weights` from `timestep_weights`).

    Drawn on the CPU from one generator per example, so a run is reproducible on any device."""
    rows = latents.repeat_interleave(multiplicity, dim=0)
    shape = (multiplicity, *latents.shape[1:])
    noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(rows.device, rows.dtype)
    if weights is None:
        draws = [torch.randint(0, num_train_timesteps, (multiplicity,), generator=g) for g in generators]
    else:
        draws = [torch.multinomial(weights, multiplicity, replacement=True, generator=g) for g in generators]
    timesteps = torch.cat(draws)
    return rows, noise, timesteps.to(rows.device)


def per_row_loss(
    model: nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Denoising MSE of each row of a UNet conditioned on `encoder_hidden_states`: shape [rows]."""
    return denoising_loss(lambda noisy, t: model(noisy, t, encoder_hidden_states=encoder_hidden_states).sample,
                          noise_scheduler, latents, noise, timesteps)


def denoising_loss(predict, noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """DDPM noising with the scheduler's prediction type; `predict(noisy, timesteps)` is the denoiser
    call. Each row's MSE averaged over latent elements: shape [rows]."""
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
    prediction = predict(noisy, timesteps)
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
