"""The only step of DP-MEPF that touches private data: one noisy release of embedding sums.

Neighbouring relation: ADD/REMOVE ONE example (an image with its label), the same relation as
dpdiff's DP-SGD accounting. Under it the dataset size n is private, so it is released with noise
too, and every released quantity is a SUM:

    release       value                          L2 sensitivity   why
    sum1          sum_i phi(x_i), per class       C                ||phi(x)|| <= C; one row changes
    sum2          sum_i phi(x_i)**2, per class    C**2             ||phi**2||_2 <= ||phi||_2**2 <= C**2
    counts        n_c per class (or n)            1                one count changes by one
    val_*         the same on held-out examples   same             composed, not treated as parallel

Held-out (validation) examples are chosen by a salted hash of each example's own pixels and label,
not by a random split of the index list: a fixed-size or positional split of D and of D + {x} can
move MANY examples between the parts, breaking the one-row sensitivity. A per-example rule moves
none, so adding x changes exactly one row of one part.

Each gets Gaussian noise of std sigma * sensitivity, and `calibration` picks sigma so that ALL of
them together are (epsilon, delta)-DP (analytic Gaussian, exact composition of Gaussians). The
exact class counts are never released (the paper's code used them; we do not). The means the
generator matches are post-processing: noisy sum / max(noisy count, 1).

The noise comes from a generator seeded with OS entropy; a fixed `noise_seed` exists only so tests
can check the noise, and a release made with one is marked as not private.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from dpdiff.errors import ConfigError, DataError, IntegrityError, PrivacyError
from dpdiff.features import EFFICIENTNET_LITE0_LEGACY_DEFAULT_LAYERS, FeatureExtractor
from dpdiff.io import atomic_path, write_json
from dpdiff.mepf.calibration import (
    ACCOUNTANT_NAME,
    GaussianRelease,
    composed_mu,
    epsilon_for_releases,
    noise_multiplier_for_releases,
)
from dpdiff.mepf.embedding import EmbeddingConfig, EmbeddingSums, embedding_sums
from dpdiff.privacy.accounting import check_delta

NEIGHBOURING_RELATION = "add_or_remove_one"
RELEASE_FILE = "release.safetensors"
PRIVACY_FILE = "privacy.json"
_METADATA_KEY = "dpdiff_mepf_release"
_HASH_CHUNK = 1024  # images hashed per slice by validation_mask


def planned_releases(config: EmbeddingConfig, with_validation: bool) -> list[GaussianRelease]:
    """Every Gaussian release a run makes, with its sensitivity under add/remove-one."""
    parts = ["", "val_"] if with_validation else [""]
    releases = []
    for prefix in parts:
        releases.append(GaussianRelease(f"{prefix}sum1", config.max_norm))
        if config.moments == 2:
            releases.append(GaussianRelease(f"{prefix}sum2", config.max_norm ** 2))
        releases.append(GaussianRelease(f"{prefix}counts", 1.0))
    return releases


def add_noise(sums: EmbeddingSums, releases: list[GaussianRelease], noise_multiplier: float, generator: torch.Generator, prefix: str = "") -> dict[str, Tensor]:
    """Noisy copies of the exact sums (float64), one independent draw per release."""
    by_name = {r.name: r for r in releases}
    exact = {"sum1": sums.sum1, "counts": sums.counts}
    if sums.sum2 is not None:
        exact["sum2"] = sums.sum2
    noisy = {}
    for key, value in exact.items():
        release = by_name.get(prefix + key)
        if release is None:
            raise PrivacyError(f"{prefix + key} would be released without being accounted for")
        std = release.noise_std(noise_multiplier)
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * std
        noisy[prefix + key] = value.to(torch.float64) + noise
    return noisy


@dataclass
class EmbeddingTarget:
    """What the generator matches for one part (train or validation): post-processed noisy means."""

    mean1: Tensor  # [K, D]
    mean2: Tensor | None
    class_weights: Tensor  # [K], sums to 1


@dataclass
class ReleasedEmbedding:
    """The public output of the private step: noisy sums and counts, plus what phi(x) is."""

    config: EmbeddingConfig
    class_names: list[str]
    resolution: int
    channels: int
    tensors: dict[str, Tensor]
    privacy: dict

    @property
    def has_validation(self) -> bool:
        return "val_sum1" in self.tensors

    def target(self, part: str = "train") -> EmbeddingTarget:
        prefix = {"train": "", "validation": "val_"}[part]
        if prefix + "sum1" not in self.tensors:
            raise ConfigError(f"this release has no {part} embedding")
        counts = self.tensors[prefix + "counts"]
        denom = counts.clamp(min=1.0).unsqueeze(1)
        mean1 = (self.tensors[prefix + "sum1"] / denom).float()
        sum2 = self.tensors.get(prefix + "sum2")
        mean2 = (sum2 / denom).float() if sum2 is not None else None
        weights = counts.clamp(min=0.0)
        weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(counts, 1.0 / len(counts))
        return EmbeddingTarget(mean1=mean1, mean2=mean2, class_weights=weights.float())


def release_embedding(
    extractor: FeatureExtractor,
    images: Tensor,
    labels: Tensor,
    class_names: list[str],
    config: EmbeddingConfig,
    target_epsilon: float,
    delta: float,
    validation_fraction: float = 0.0,
    split_seed: int = 0,
    dataset: str = "",
    batch_size: int = 128,
    force_delta: bool = False,
    noise_seed: int | None = None,
    progress: bool | None = None,
) -> ReleasedEmbedding:
    """Embed the private images once and release the noisy sums under (target_epsilon, delta).

    About `validation_fraction` of the examples (chosen per example by `validation_mask`) get their
    own noisy embedding for checkpoint selection; it is part of the budget."""
    n = int(images.shape[0])
    labels = validate_private_data(images, labels, len(class_names))
    check_delta(delta, n, force=force_delta)
    if not (0.0 <= validation_fraction < 1.0):
        raise ConfigError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    releases = planned_releases(config, with_validation=validation_fraction > 0)
    sigma = noise_multiplier_for_releases(releases, target_epsilon, delta)

    if validation_fraction > 0:
        held_out = validation_mask(images, labels, validation_fraction, split_seed)
        parts = {"": torch.nonzero(~held_out).flatten(), "val_": torch.nonzero(held_out).flatten()}
    else:
        parts = {"": torch.arange(n)}
    rng = torch.Generator().manual_seed(noise_seed if noise_seed is not None else secrets.randbits(63))
    tensors: dict[str, Tensor] = {}
    for prefix, index in parts.items():
        desc = "embedding private data" + (" (validation)" if prefix else "")
        sums = embedding_sums(extractor, images[index], labels[index], len(class_names), config, batch_size, progress, desc)
        tensors.update(add_noise(sums, releases, sigma, rng, prefix))
        del sums
    epsilon = epsilon_for_releases(releases, sigma, delta)
    privacy = {
        "method": "mepf",
        "epsilon": epsilon,
        "target_epsilon": float(target_epsilon),
        "delta": float(delta),
        "accountant": ACCOUNTANT_NAME,
        "noise_multiplier": sigma,
        "max_grad_norm": float(config.max_norm),
        "mu": composed_mu(releases, sigma),
        "num_examples": round(float(sum(tensors[p + "counts"].sum() for p in parts)), 1),
        "num_examples_kind": "noisy: the released class counts summed (under add/remove-one the true n is private)",
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "unit_of_privacy": "one training image together with its label",
        "dataset": dataset,
        "feature_extractor": config.feature_extractor,
        "releases": [dict(r.to_dict(), noise_std=r.noise_std(sigma)) for r in releases],
        "sensitivity": {r.name: r.sensitivity for r in releases},
        "labelled": bool(config.labelled),
        "noise_source": "os_entropy" if noise_seed is None else "FIXED SEED: for testing only, NOT private",
        "not_covered": "hyperparameters tuned on the private data; the delta < 1/n check uses the true n",
    }
    # the layers the sums were computed on, by name: a later default must not change what this release means
    config = replace(config, layers=list(extractor.layer_names))
    return ReleasedEmbedding(config, list(class_names), int(images.shape[-1]), int(images.shape[1]), tensors, privacy)


def validation_mask(images: Tensor, labels: Tensor, fraction: float, salt: int = 0) -> Tensor:
    """True for held-out examples: a salted hash of each example's own pixels and label < fraction.

    Depends on nothing but the example itself, so neighbouring datasets split alike."""
    threshold = int(fraction * 2 ** 64)
    out = torch.zeros(images.shape[0], dtype=torch.bool)
    key = int(salt).to_bytes(8, "little", signed=True)
    for start in range(0, images.shape[0], _HASH_CHUNK):  # a chunk at a time: `images` may decode on read
        raw = images[start:start + _HASH_CHUNK].detach().to(torch.float32).cpu().contiguous().numpy()
        for offset, row in enumerate(raw):
            i = start + offset
            digest = hashlib.blake2b(row.tobytes() + int(labels[i]).to_bytes(8, "little"), digest_size=8, key=key).digest()
            out[i] = int.from_bytes(digest, "little") < threshold
    return out


def validate_private_data(images: Tensor, labels: Tensor | None, num_classes: int) -> Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[-1] != images.shape[-2]:
        raise DataError(f"images must be [N, 1|3, H, H] in [-1, 1], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise DataError("no private images: the dataset is empty")
    if num_classes < 1:
        raise DataError("at least one class name is needed")
    if labels is None:
        return torch.zeros(images.shape[0], dtype=torch.long)
    labels = torch.as_tensor(labels).long()
    if labels.shape != (images.shape[0],):
        raise DataError(f"need one label per image: {images.shape[0]} images, labels of shape {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"labels must lie in [0, {num_classes - 1}], found {labels.min().item()}..{labels.max().item()}")
    return labels


def save_release(release: ReleasedEmbedding, directory: str | os.PathLike) -> Path:
    """release.safetensors (noisy tensors + what phi is, in the metadata) and privacy.json."""
    directory = Path(directory)
    meta = {
        "config": release.config.to_dict(),
        "class_names": release.class_names,
        "resolution": release.resolution,
        "channels": release.channels,
        "privacy": release.privacy,
    }
    with atomic_path(directory / RELEASE_FILE) as tmp:
        tensors = {k: v.contiguous() for k, v in release.tensors.items()}
        save_file(tensors, str(tmp), metadata={_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    write_json(directory / PRIVACY_FILE, release.privacy)
    return directory / RELEASE_FILE


def load_release(path: str | os.PathLike) -> ReleasedEmbedding:
    """Load a release (its folder or the .safetensors file); no private data needed."""
    path = Path(path)
    file = path / RELEASE_FILE if path.is_dir() else path
    if not file.is_file():
        raise IntegrityError(f"no DP-MEPF release at {file}; run `dpdiff mepf` first or pass the folder holding {RELEASE_FILE}")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_METADATA_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, ValueError, OSError, SafetensorError) as e:
        raise IntegrityError(f"{file} is not a readable DP-MEPF release: {e}") from e
    if "sum1" not in tensors or "counts" not in tensors:
        raise IntegrityError(f"{file} lacks the sum1/counts tensors of a DP-MEPF release")
    config = EmbeddingConfig.from_dict(meta["config"])
    if config.layers is None and config.feature_extractor == "efficientnet_lite0":
        # releases stored None ("the default") until 2026-12-06: they were computed on the default of then
        config = replace(config, layers=list(EFFICIENTNET_LITE0_LEGACY_DEFAULT_LAYERS))
    if not math.isfinite(float(meta["privacy"].get("epsilon", math.nan))):
        raise IntegrityError(f"{file} has no valid privacy record")
    return ReleasedEmbedding(config, meta["class_names"], int(meta["resolution"]), int(meta["channels"]), tensors, meta["privacy"])
