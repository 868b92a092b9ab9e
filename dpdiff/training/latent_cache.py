"""Encode the private set once with the frozen VAE and text encoder; reuse the latents every epoch.

Each cached entry is a function of ONE example through public, frozen, data-independent
encoders, so building the cache costs no privacy: the DP-SGD step sees the same per-example inputs
it would see if it encoded every step, only cheaper."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dpdiff.data.sources import ImageSource
from dpdiff.data.transforms import images_to_tensor
from dpdiff.privacy.diffusion_loss import example_generator


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """[len(prompts), T, D] hidden states, padded to the tokenizer's max length as SD does."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(
            prompts[i : i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(text_encoder.device)
        out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_images(vae, images, resolution: int, batch_size: int = 256, show_progress: bool = True) -> torch.Tensor:
    """Posterior means scaled by the VAE's scaling factor: [N, 4, h, w] (fp32, CPU)."""
    scale = vae.config.scaling_factor
    dtype, device = vae.dtype, vae.device
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encoding latents", disable=not show_progress):
        x = images_to_tensor(images[i : i + batch_size], resolution, channels=vae.config.in_channels)
        out.append((vae.encode(x.to(device, dtype)).latent_dist.mode() * scale).float().cpu())
    return torch.cat(out)


@dataclass
class LatentCache(Dataset):
    """Per-example latents + an index into the (few) distinct prompt embeddings.

    `cond_dropout`: with this probability an example's prompt is replaced by the empty prompt, so
    classifier-free guidance keeps working. The coin is keyed by (seed, step, index) like the
    engine's noise draws: independent of the data, reproducible, and unchanged by a resume."""

    latents: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_embeddings: torch.Tensor  # [P + 1, T, D]; the last row is the empty prompt
    labels: torch.Tensor
    cond_dropout: float = 0.0
    seed: int = 0
    step: int = 0  # the training loop keeps this equal to the engine's step count

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict:
        prompt = int(self.prompt_ids[index])
        if self.cond_dropout > 0:
            coin = torch.rand((), generator=example_generator(self.seed + 1, self.step, index))
            if coin < self.cond_dropout:
                prompt = len(self.prompt_embeddings) - 1
        return {"latents": self.latents[index], "encoder_hidden_states": self.prompt_embeddings[prompt]}


def build_latent_cache(pipeline, source: ImageSource, resolution: int, cond_dropout: float = 0.0, seed: int = 0,
                       batch_size: int = 256, show_progress: bool = True) -> LatentCache:
    """Run the frozen encoders once over `source` (images and prompts)."""
    prompts = list(source.dataset["prompt"])
    distinct = list(dict.fromkeys(prompts))
    index = {p: i for i, p in enumerate(distinct)}
    embeddings = encode_prompts(pipeline.text_encoder, pipeline.tokenizer, distinct + [""])
    latents = encode_images(pipeline.vae, source.dataset["image"], resolution, batch_size, show_progress)
    return LatentCache(
        latents=latents,
        prompt_ids=torch.tensor([index[p] for p in prompts]),
        prompt_embeddings=embeddings,
        labels=torch.tensor(source.dataset["label"]),
        cond_dropout=cond_dropout,
        seed=seed,
    )
