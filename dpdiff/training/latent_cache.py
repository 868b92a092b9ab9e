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
def encode_images(vae, images, resolution: int, batch_size: int = 256, show_progress: bool = True,
                  mirrored: bool = False) -> torch.Tensor:
    """Posterior means, shifted and scaled as the family's training scripts do: [N, C, h, w] (fp32, CPU).

    `mirrored`: encode each image flipped left-right (the latents `--random_flip` draws from; the VAE
    is not equivariant to flips, so flipping a latent is not the latent of the flipped image).

    (z - shift_factor) * scaling_factor; shift_factor is 0 for SD's VAE, set for SD3/Flux. A
    deterministic autoencoder (Sana's AutoencoderDC) returns its latent directly."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    dtype, device = vae.dtype, vae.device
    out = []
    desc = "encoding mirrored latents" if mirrored else "encoding latents"
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not show_progress):
        x = images_to_tensor(images[i : i + batch_size], resolution, channels=vae.config.in_channels, mirrored=mirrored)
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
    engine's noise draws: independent of the data, reproducible, and unchanged by a resume.

    `flipped_latents` (`--random_flip`): the latents of the mirrored images, [N, C, h, w]; each
    (step, example) then takes it with probability 1/2, by a public coin keyed (seed + 2, step, index)
    like the dropout coin. None (the default): no flipping."""

    latents: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_embeddings: torch.Tensor | dict  # [P + 1, ...] per name; the last row is the unconditional one
    labels: torch.Tensor
    cond_dropout: float = 0.0
    seed: int = 0
    step: int = 0  # the training loop keeps this equal to the engine's step count
    flipped_latents: torch.Tensor | None = None  # --random_flip: the mirrored images' latents

    @classmethod
    def per_example(cls, latents: torch.Tensor, conditions: dict) -> "LatentCache":
        """A cache whose every example has its own conditioning row (no prompt groups, no guidance
        dropout): for tests and benchmarks that bring their own latents and encoded conditions."""
        n = len(latents)
        return cls(latents=latents, prompt_ids=torch.arange(n), prompt_embeddings=dict(conditions),
                   labels=torch.zeros(n, dtype=torch.long))

    def __post_init__(self):
        if self.flipped_latents is not None and self.flipped_latents.shape != self.latents.shape:
            raise ValueError(f"flipped_latents {tuple(self.flipped_latents.shape)} must match latents {tuple(self.latents.shape)}")
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

    def flipped(self, index: int, step: int | None = None) -> bool:
        """Whether example `index` is drawn mirrored at `step` (default: the current step): a fair public coin."""
        if self.flipped_latents is None:
            return False
        step = self.step if step is None else step
        return bool(torch.rand((), generator=example_generator(self.seed + 2, step, index)) < 0.5)

    def __getitem__(self, index: int) -> dict:
        prompt = int(self.prompt_ids[index])
        latents = self.flipped_latents[index] if self.flipped(index) else self.latents[index]
        if self.cond_dropout > 0:
            coin = torch.rand((), generator=example_generator(self.seed + 1, self.step, index))
            if coin < self.cond_dropout:
                prompt = self.num_conditions - 1
        return {"latents": latents, **{name: value[prompt] for name, value in self.prompt_embeddings.items()}}


def build_latent_cache(pipeline, source: ImageSource, resolution: int, cond_dropout: float = 0.0, seed: int = 0,
                       batch_size: int = 256, show_progress: bool = True, family=None,
                       random_flip: bool = False) -> LatentCache:
    """Run the frozen encoders once over `source` (images, and prompts or labels as the family conditions).

    Examples are grouped by their prompt (label families: their class label); the family encodes each
    distinct group once, plus the unconditional one (empty prompt / null class) for guidance.
    `random_flip`: also encode every image mirrored (twice the latent memory), see `LatentCache`.
    `resolution` must be a multiple of the VAE factor times the denoiser's patch size."""
    from dpdiff.data.transforms import check_resolution
    from dpdiff.families import family_for_pipeline
    from dpdiff.families.base import NULL_LABEL, UNCONDITIONAL_PROMPT

    family = family or family_for_pipeline(pipeline)
    check_resolution(resolution, family.resolution_multiple(pipeline))
    by_label = family.conditioning == "label"
    keys = [int(x) for x in source.dataset["label"]] if by_label else list(source.dataset["prompt"])
    distinct = list(dict.fromkeys(keys))
    index = {k: i for i, k in enumerate(distinct)}
    conditions = family.encode_conditions(pipeline, distinct + [NULL_LABEL if by_label else UNCONDITIONAL_PROMPT], resolution)
    images = source.dataset["image"]
    latents = encode_images(pipeline.vae, images, resolution, batch_size, show_progress)
    flipped = encode_images(pipeline.vae, images, resolution, batch_size, show_progress, mirrored=True) if random_flip else None
    return LatentCache(
        latents=latents,
        prompt_ids=torch.tensor([index[k] for k in keys]),
        prompt_embeddings=conditions,
        labels=torch.tensor(source.dataset["label"]),
        cond_dropout=cond_dropout,
        seed=seed,
        flipped_latents=flipped,
    )
