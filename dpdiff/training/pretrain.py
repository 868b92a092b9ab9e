"""Non-private pretraining of the tiny preset on PUBLIC data only (MNIST-5k + Animal-MNIST).

This stands in for the public pretraining of a real Stable Diffusion: the private data never
enters here. Stage 1 trains the VAE (32x32 <-> 8x8x4), stage 2 the UNet and the text encoder on
the frozen VAE's latents, with 10% empty prompts so classifier-free guidance works."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpdiff.data import load_source
from dpdiff.data.transforms import images_to_tensor

PUBLIC_SOURCES = ("mnist5k", "animal_mnist")


@dataclass
class PublicCorpus:
    images: torch.Tensor  # [N, 3, 32, 32] in [-1, 1]
    prompts: list[str]
    sources: list[str] = field(default_factory=list)


def load_public_corpus(sources=PUBLIC_SOURCES, limit: int | None = None, resolution: int = 32, seed: int = 0) -> PublicCorpus:
    images, prompts = [], []
    for name in sources:
        src = load_source(name, "train", limit=limit, seed=seed)
        images.append(images_to_tensor(src.dataset["image"], resolution, channels=3))
        prompts += list(src.dataset["prompt"])
    return PublicCorpus(torch.cat(images), prompts, list(sources))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips and smooth random shading: silhouettes and strokes gain the grey-level texture that
    other domains (clothes, photos) have, so the VAE does not only learn near-binary images."""
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    coarse = torch.rand(n, 1, 4, 4, generator=generator)
    shade = F.interpolate(coarse, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    textured = torch.rand(n, generator=generator) < 0.5
    strength = torch.rand(n, 1, 1, 1, generator=generator) * 0.7
    unit = (x + 1) / 2 * torch.where(textured[:, None, None, None], 1 - strength * shade, torch.ones_like(shade))
    return unit * 2 - 1


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0) -> list[float]:
    """Reconstruction (MSE) + a small KL term, as in SD's autoencoder (without the GAN/LPIPS terms)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.05)
    vae.train()
    losses = []
    bar = tqdm(_batches(len(images), batch_size, steps, g), total=steps, desc="vae")
    for idx in bar:
        x = augment(images[idx], g)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means, unscaled."""
    return torch.cat([vae.encode(images[i : i + batch_size]).latent_dist.mode() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def reconstruction_mse(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean squared error in [-1, 1] pixel units of decode(encode(x)) (posterior mean)."""
    err, n = 0.0, 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        err += F.mse_loss(recon, x, reduction="sum").item()
        n += x.numel()
    return err / n


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_denoiser(pipeline, latents: torch.Tensor, prompts: list[str], steps: int, batch_size: int = 128, lr: float = 5e-4, uncond_prob: float = 0.1, seed: int = 0) -> list[float]:
    """UNet + text encoder, epsilon prediction on scaled latents, DDPM noise schedule."""
    from dpdiff.pipelines.preset import training_scheduler

    unet, text_encoder, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    scheduler = training_scheduler(pipeline)
    g = torch.Generator().manual_seed(seed)
    token_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.05)
    unet.train()
    text_encoder.train()
    losses = []
    bar = tqdm(_batches(len(latents), batch_size, steps, g), total=steps, desc="unet")
    for idx in bar:
        z = latents[idx]
        ids = token_ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < uncond_prob
        ids[drop] = empty_ids
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        noisy = scheduler.add_noise(z, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    unet.eval()
    text_encoder.eval()
    return losses


def set_latent_scaling(vae, latents: torch.Tensor) -> float:
    """SD's convention: scale latents to unit variance with a factor stored in the VAE config."""
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def tail_mean(values: list[float], n: int = 100) -> float:
    tail = values[-n:]
    return float(sum(tail) / len(tail)) if tail else math.nan
