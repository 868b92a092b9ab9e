"""Training objectives: what a denoiser is asked to predict from a noised latent.

An objective draws each row's noise and timestep (from the example's own generator, so the draws
are public randomness keyed by (seed, step, example)) and turns a prediction into one loss per row.
Two kinds cover every diffusers family:

- `DenoisingObjective`: DDPM-style noising x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with an epsilon,
  v-prediction or sample target (SD-1.x/2.x, SDXL, PixArt, DiT);
- `FlowMatchingObjective`: rectified flow x_s = (1 - s) x_0 + s eps, target eps - x_0, as the diffusers
  SD3/Flux/Sana training scripts do it (timestep sampling by `weighting_scheme`).

The engine only calls `draw` and `per_row_loss`; it never asks which objective it runs."""

from __future__ import annotations

import math
from typing import Callable

import torch

from dpdiff.families.diffusion_loss import PREDICTION_TYPES, denoising_loss, draw_diffusion_inputs

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy rows, timesteps) -> prediction
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode")


class DenoisingObjective:
    """DDPM noising with the scheduler's own schedule and prediction type."""

    kind = "denoising"

    def __init__(self, noise_scheduler):
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.noise_scheduler = noise_scheduler
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)

    def draw(self, latents, multiplicity, generators, weights=None):
        """(noise, timesteps) for the K rows of each example (rows i*K .. i*K+K-1 are example i)."""
        _, noise, timesteps = draw_diffusion_inputs(latents, multiplicity, self.num_train_timesteps, generators, weights)
        return noise, timesteps

    def per_row_loss(self, predict: Predict, latents, noise, timesteps) -> torch.Tensor:
        return denoising_loss(predict, self.noise_scheduler, latents, noise, timesteps)

    def describe(self) -> dict:
        return {"objective": self.kind, "prediction_type": self.prediction_type}


class FlowMatchingObjective:
    """Rectified flow on the scheduler's (shifted) sigma grid, as diffusers' SD3/Flux scripts train.

    A timestep is drawn as an index into the training grid, ordered here from the least to the most
    noisy (so the `timestep_bias` weights mean the same as for DDPM: `later` = noisier); by default the
    index is uniform, `logit_normal`/`mode` draw it as `compute_density_for_timestep_sampling` does.
    The denoiser gets the scheduler's timestep value; sigma = timestep / num_train_timesteps."""

    kind = "flow_matching"

    def __init__(self, noise_scheduler, weighting_scheme: str = "none", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme {weighting_scheme!r}: expected one of {WEIGHTING_SCHEMES}")
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        timesteps = torch.as_tensor(noise_scheduler.timesteps, dtype=torch.float32)
        if len(timesteps) != self.num_train_timesteps:
            raise ValueError(
                f"the flow-matching scheduler holds {len(timesteps)} timesteps, not its {self.num_train_timesteps} training "
                "timesteps; pass a freshly built scheduler (set_timesteps for sampling changes the grid)"
            )
        self.grid = timesteps.flip(0)  # index 0 = least noisy
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)

    def draw(self, latents, multiplicity, generators, weights=None):
        shape = (multiplicity, *latents.shape[1:])
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(latents.device, latents.dtype)
        indices = torch.cat([self._indices(multiplicity, g, weights) for g in generators])
        return noise, self.grid[indices].to(latents.device)

    def _indices(self, k: int, generator: torch.Generator, weights) -> torch.Tensor:
        n = self.num_train_timesteps
        if weights is not None:
            return torch.multinomial(weights, k, replacement=True, generator=generator)
        if self.weighting_scheme == "logit_normal":
            u = torch.sigmoid(torch.randn(k, generator=generator) * self.logit_std + self.logit_mean)
        elif self.weighting_scheme == "mode":
            u = torch.rand(k, generator=generator)
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            return torch.randint(0, n, (k,), generator=generator)
        # u is the noise level in (0, 1): index of the grid point at that level
        return (u * n).long().clamp(0, n - 1)

    def per_row_loss(self, predict: Predict, latents, noise, timesteps) -> torch.Tensor:
        sigma = (timesteps.float() / self.num_train_timesteps).view(-1, *([1] * (latents.dim() - 1)))
        sigma = sigma.to(latents.dtype)
        noisy = (1.0 - sigma) * latents + sigma * noise
        prediction = predict(noisy, timesteps)
        target = noise - latents
        return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)

    def describe(self) -> dict:
        return {"objective": self.kind, "weighting_scheme": self.weighting_scheme}
