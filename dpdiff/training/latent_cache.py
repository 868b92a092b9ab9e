"""Encode the private set once with the frozen VAE and text encoder(s); reuse the latents every epoch.

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
from dpdiff.families.stable_diffusion import encode_clip_prompts as encode_prompts  # noqa: F401 (SD's prompt encoder)
from dpdiff.privacy.diffusion_loss import example_generator


@torch.no_grad()
def encode_images(vae, images, resolution: int, batch_size: int = 256, show_progress: bool = True) -> torch.Tensor:
    """Posterior means, shifted and scaled as the family's training scripts do: [N, C, h, w] (fp32, CPU).

    (z - shift_factor) * scaling_factor; shift_factor is 0 for SD's VAE, set for SD3/Flux. A
    deterministic autoencoder (Sana's AutoencoderDC) returns its latent directly."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    dtype, device = vae.dtype, vae.device
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encoding latents", disable=not show_progress):
        x = images_to_tensor(images[i : i + batch_size], resolution, channels=vae.config.in_channels)
        encoded = vae.encode(x.to(device, dtype))
        dist = getattr(encoded, "latent_dist", None)
        z = dist.mode() if dist is not None else encoded.latent
        out.append(((z - shift) * scale).float().cpu())
    return torch.cat(out)


@dataclass
class LatentCache(Dataset):
    """Per-example latents + an index into the (few) distinct conditionings (prompts, or class labels).

    `prompt_embeddings`: the family's conditioning tensors by name, [P + 1, ...] each, the last row the
    unconditional one (empty prompt / null class); a bare tensor is the `encoder_hidden_states` of the
    SD family.

    `cond_dropout`: with this probability an example's prompt is replaced by the empty prompt, so
    classifier-free guidance keeps working. The coin is keyed by (seed, step, index) like the
    engine's noise draws: independent of the data, reproducible, and unchanged by a resume."""

    latents: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_embeddings: torch.Tensor | dict  # [P + 1, ...] per name; the last row is the unconditional one
    labels: torch.Tensor
    cond_dropout: float = 0.0
    seed: int = 0
    step: int = 0  # the training loop keeps this equal to the engine's step count

    def __post_init__(self):
        if isinstance(self.prompt_embeddings, torch.Tensor):
            self.prompt_embeddings = {"encoder_hidden_states": self.prompt_embeddings}
        rows = {name: len(value) for name, value in self.prompt_embeddings.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"every conditioning tensor needs one row per prompt, got {rows}")

    @property
    def conditions(self) -> dict[str, torch.Tensor]:
        return self.prompt_embeddings

    @property
    def num_conditions(self) -> int:
        return len(next(iter(self.prompt_embeddings.values())))

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict:
        prompt = int(self.prompt_ids[index])
        if self.cond_dropout > 0:
            coin = torch.rand((), generator=example_generator(self.seed + 1, self.step, index))
            if coin < self.cond_dropout:
                prompt = self.num_conditions - 1
        return {"latents": self.latents[index], **{name: value[prompt] for name, value in self.prompt_embeddings.items()}}


def build_latent_cache(pipeline, source: ImageSource, resolution: int, cond_dropout: float = 0.0, seed: int = 0,
                       batch_size: int = 256, show_progress: bool = True, family=None) -> LatentCache:
    """Run the frozen encoders once over `source` (images, and prompts or labels as the family conditions).

    Examples are grouped by their prompt (label families: their class label); the family encodes each
    distinct group once, plus the unconditional one (empty prompt / null class) for guidance."""
    from dpdiff.families import family_for_pipeline
    from dpdiff.families.base import NULL_LABEL, UNCONDITIONAL_PROMPT

    family = family or family_for_pipeline(pipeline)
    by_label = family.conditioning == "label"
    keys = [int(x) for x in source.dataset["label"]] if by_label else list(source.dataset["prompt"])
    distinct = list(dict.fromkeys(keys))
    index = {k: i for i, k in enumerate(distinct)}
    conditions = family.encode_conditions(pipeline, distinct + [NULL_LABEL if by_label else UNCONDITIONAL_PROMPT], resolution)
    latents = encode_images(pipeline.vae, source.dataset["image"], resolution, batch_size, show_progress)
    return LatentCache(
        latents=latents,
        prompt_ids=torch.tensor([index[k] for k in keys]),
        prompt_embeddings=conditions,
        labels=torch.tensor(source.dataset["label"]),
        cond_dropout=cond_dropout,
        seed=seed,
    )
