"""The per-example perceptual embedding phi(x) of DP-MEPF and its exact (pre-noise) sums.

phi(x) concatenates B blocks computed from a frozen feature extractor: for each chosen layer the
per-channel spatial mean (and, with channel_stats="mean_var", the per-channel spatial variance),
plus the pooled output when `include_pooled`, plus (with `pixels`) the image itself, grey levels in
[0, 1] at the data's resolution: the class's mean picture and per-pixel second moment, the layout a
classifier on pixels reads and an ImageNet extractor at 32 px barely sees. Each block is rescaled to
norm <= C / sqrt(B), so

    ||phi(x)||_2 <= C   for every x            (C = max_norm, the "clipping" bound)

whatever the data. Rescaling block by block keeps a 1280-d pooled vector from drowning a 24-channel
layer. It is a fixed per-example map (frozen extractor in eval mode, no statistic of other
examples), which is what the sensitivity argument needs. The same function embeds generated images
during generator training (with gradients).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dpdiff.errors import ConfigError
from dpdiff.features import FeatureExtractor, FeatureOutput, load_feature_extractor

CHANNEL_STATS = ("mean", "mean_var")
_NORM_FLOOR = 1e-12  # inside the sqrt: keeps the gradient finite at a zero block, norm stays <= bound


@dataclass
class EmbeddingConfig:
    """What phi(x) is made of. Public (hyperparameters), stored with every release."""

    feature_extractor: str = "efficientnet_lite0"
    layers: list[str] | None = None  # None: the extractor's default layers
    input_size: int = 64
    channel_stats: str = "mean_var"
    include_pooled: bool = True
    max_norm: float = 1.0  # C: ||phi(x)|| <= C
    moments: int = 1  # 1: release mean phi; 2: also mean phi**2
    labelled: bool = True
    pixels: bool = False  # one more block: the image's grey levels (releases made before it existed: False)

    def __post_init__(self):
        if self.channel_stats not in CHANNEL_STATS:
            raise ConfigError(f"channel_stats must be one of {CHANNEL_STATS}, got {self.channel_stats!r}")
        if not (isinstance(self.max_norm, (int, float)) and math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ConfigError(f"max_grad_norm (C, the norm bound of each example's features) must be > 0, got {self.max_norm!r}")
        if self.moments not in (1, 2):
            raise ConfigError(f"moments must be 1 (mean embedding) or 2 (mean and second moment), got {self.moments!r}")
        if self.layers is not None and len(self.layers) == 0 and not self.include_pooled:
            raise ConfigError("the embedding is empty: give at least one layer or keep the pooled output")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EmbeddingConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def feature_blocks(output: FeatureOutput, config: EmbeddingConfig, images: Tensor | None = None) -> list[Tensor]:
    """The unnormalised blocks of phi for one batch: [N, d_b] each. `images` (in [-1, 1]) only for `pixels`."""
    blocks = []
    if config.pixels:
        if images is None:
            raise ConfigError("this embedding has a pixel block: pass the images with the extractor's output")
        blocks.append((images.flatten(1) + 1) / 2)  # background 0: the block's direction is the garment's shape
    for act in output.layers:
        flat = act.flatten(2)
        blocks.append(flat.mean(dim=2))
        if config.channel_stats == "mean_var" and flat.shape[2] > 1:  # a 1x1 map has no variance
            blocks.append(flat.var(dim=2, correction=0))
    if config.include_pooled:
        blocks.append(output.pooled)
    return blocks


def feature_vector(output: FeatureOutput, config: EmbeddingConfig, images: Tensor | None = None) -> Tensor:
    """phi for one batch: [N, D], every row of norm <= C. Differentiable (generator training)."""
    blocks = feature_blocks(output, config, images)
    bound = config.max_norm / math.sqrt(len(blocks))
    scaled = []
    for block in blocks:
        norm = torch.sqrt(block.pow(2).sum(dim=1, keepdim=True) + _NORM_FLOOR)
        scaled.append(block * (bound / norm))
    return torch.cat(scaled, dim=1)


def embed(extractor: FeatureExtractor, images: Tensor, config: EmbeddingConfig) -> Tensor:
    """phi(x) of one batch of images in [-1, 1]; follows the caller's grad mode."""
    return feature_vector(extractor.extract(images), config, images)


def build_extractor(config: EmbeddingConfig, batch_size: int = 128, device="cpu") -> FeatureExtractor:
    """The frozen extractor this embedding is defined on."""
    return load_feature_extractor(config.feature_extractor, layers=config.layers, input_size=config.input_size, batch_size=batch_size, device=device)


def embedding_dim(extractor: FeatureExtractor, config: EmbeddingConfig, resolution: int, channels: int) -> int:
    with torch.no_grad():
        return embed(extractor, torch.zeros(1, channels, resolution, resolution), config).shape[1]


@dataclass
class EmbeddingSums:
    """Exact sufficient statistics of the private data, BEFORE noise: never saved, never logged."""

    sum1: Tensor  # [K, D] float64: sum of phi(x) over the examples of each class
    sum2: Tensor | None  # [K, D] float64: sum of phi(x)**2, when moments == 2
    counts: Tensor  # [K] float64


def embedding_rows(
    extractor: FeatureExtractor,
    images: Tensor,
    config: EmbeddingConfig,
    batch_size: int = 128,
    progress: bool | None = None,
    desc: str = "embedding private data",
) -> Iterator[Tensor]:
    """phi(x) of the images in order, float64 [n, D] a batch, each row a function of its own image alone.

    Every batch has ONE shape: the last one is padded with public all-zero images whose rows are dropped.
    CPU kernels choose their blocking by the row count, so a short last batch would round an example's
    features differently depending on how many others share its batch (~1e-6 relative, measured) — a
    leak through the rounding the sensitivity argument does not cover."""
    batch_size = int(batch_size)
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    starts = range(0, images.shape[0], batch_size)
    show = progress if progress is not None else len(starts) > 1
    for start in tqdm(starts, desc=f"{desc} ({extractor.name})", disable=not show, unit="batch"):
        batch = images[start:start + batch_size].to(device=extractor.device, dtype=torch.float32)
        n = batch.shape[0]
        if n < batch_size:
            batch = torch.cat([batch, batch.new_zeros((batch_size - n, *batch.shape[1:]))])
        batch = batch.contiguous()  # one memory layout too: channels-last takes other kernels
        with torch.no_grad():
            phi = feature_vector(extractor.extract(batch), config, batch)[:n].to(torch.float64).cpu()
        # the bound already holds up to float32 rounding; enforce it exactly in float64 anyway
        yield phi * (config.max_norm / phi.norm(dim=1, keepdim=True).clamp(min=1e-300)).clamp(max=1.0)


def embedding_sums(
    extractor: FeatureExtractor,
    images: Tensor,
    labels: Tensor | None,
    num_classes: int,
    config: EmbeddingConfig,
    batch_size: int = 128,
    progress: bool | None = None,
    desc: str = "embedding private data",
) -> EmbeddingSums:
    """Sum phi(x) (and phi(x)**2) per class in float64. Unlabelled: one row (K = 1)."""
    rows = num_classes if config.labelled else 1
    sum1 = sum2 = None
    counts = torch.zeros(rows, dtype=torch.float64)
    if labels is None and config.labelled:
        raise ConfigError("the labelled embedding needs labels")
    start = 0
    for phi in embedding_rows(extractor, images, config, batch_size, progress, desc):
        n = phi.shape[0]
        idx = labels[start:start + n].long() if config.labelled else torch.zeros(n, dtype=torch.long)
        start += n
        if sum1 is None:
            sum1 = torch.zeros(rows, phi.shape[1], dtype=torch.float64)
            sum2 = torch.zeros_like(sum1) if config.moments == 2 else None
        sum1.index_add_(0, idx, phi)
        if sum2 is not None:
            sum2.index_add_(0, idx, phi * phi)
        counts.index_add_(0, idx, torch.ones(n, dtype=torch.float64))
    if sum1 is None:
        # an empty part still gets its (noise-only) release: what is released must not depend on the data
        dim = embedding_dim(extractor, config, images.shape[-1], images.shape[1])
        sum1 = torch.zeros(rows, dim, dtype=torch.float64)
        sum2 = torch.zeros_like(sum1) if config.moments == 2 else None
    return EmbeddingSums(sum1=sum1, sum2=sum2, counts=counts)
