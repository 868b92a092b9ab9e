"""The search's score, private by construction: trials are compared only through ONE Gaussian release.

A validation split is held out of the private set by a salted hash of each example's own pixels and label (the
rule of dpdiff/mepf/release.py: adding or removing an example moves no other example between the parts). Its
mean embedding in a frozen, public feature extractor is released once: the sum of per-example vectors clipped to
norm C (sensitivity C) and the count (sensitivity 1), each with Gaussian noise of std sigma x sensitivity
(`dpdiff.mepf.release.add_noise`, `planned_releases`). A trial's score is the distance between the mean embedding
of images it GENERATES and that release: a function of the trial's model and the release only, i.e. post-processing.
Lower is better. The release is made once per search and kept in the private state folder, so a resumed search
reuses it instead of paying for a second one.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dpdiff.errors import ConfigError, DataError
from dpdiff.io import atomic_path

DEFAULT_INPUT_SIZE = 64


@dataclass(frozen=True)
class ScoreConfig:
    """Public settings of the score (stored in privacy.json)."""

    validation_fraction: float = 0.1
    epsilon_share: float = 0.1  # of the total target epsilon, spent by the release alone
    num_samples: int = 64  # generated images per trial
    max_norm: float = 1.0  # C: each example's embedding is clipped to this norm
    feature_extractor: str = "efficientnet_lite0"
    input_size: int = DEFAULT_INPUT_SIZE
    salt: int = 0  # public: which examples are held out (fixed before the data is seen)
    num_inference_steps: int | None = None  # default: the trial's
    guidance_scale: float | None = None
    embed_batch_size: int = 64

    @classmethod
    def from_dict(cls, raw: dict, where: str = "score") -> "ScoreConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} in 'score'; known: {', '.join(sorted(known))}")
        config = cls(**raw)
        checks = {
            "validation_fraction": 0 < _num(config.validation_fraction) < 1,
            "epsilon_share": 0 < _num(config.epsilon_share) < 1,
            "num_samples": isinstance(config.num_samples, int) and config.num_samples >= 1,
            "max_norm": _num(config.max_norm) > 0,
            "input_size": isinstance(config.input_size, int) and config.input_size >= 32 and config.input_size % 32 == 0,
            "salt": isinstance(config.salt, int) and not isinstance(config.salt, bool),
            "embed_batch_size": isinstance(config.embed_batch_size, int) and config.embed_batch_size >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"{where}: bad score setting(s) {', '.join(f'{k}={getattr(config, k)!r}' for k in bad)} "
                              "(fractions and share in (0, 1), counts >= 1, input_size a multiple of 32)")
        if config.feature_extractor not in ("efficientnet_lite0", "vgg19"):
            raise ConfigError(f"{where}: feature_extractor must be efficientnet_lite0 or vgg19")
        return config

    def embedding(self):
        from dpdiff.mepf.embedding import EmbeddingConfig

        return EmbeddingConfig(feature_extractor=self.feature_extractor, input_size=self.input_size, channel_stats="mean",
                               include_pooled=True, max_norm=float(self.max_norm), moments=1, labelled=False)

    def to_dict(self) -> dict:
        return asdict(self)


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def in_validation(image, label: int, fraction: float, salt: int = 0) -> bool:
    """The per-example rule: a keyed hash of the example's own pixels (and size, mode) and label < fraction."""
    arr = np.asarray(image)
    key = int(salt).to_bytes(8, "little", signed=True)
    head = f"{getattr(image, 'mode', '')}:{arr.shape}:{int(label)}".encode()
    digest = hashlib.blake2b(head + arr.tobytes(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") < int(fraction * 2**64)


def split_source(source, fraction: float, salt: int):
    """(training source, validation rows) of an ImageSource; each example's side depends on itself alone."""
    from dpdiff.data.image_source import ImageSource

    held = [i for i, row in enumerate(source.dataset) if in_validation(row["image"], row["label"], fraction, salt)]
    held_set = set(held)
    train_idx = [i for i in range(len(source)) if i not in held_set]
    if not held or not train_idx:
        raise DataError(f"the validation split (fraction {fraction}) of {len(source)} examples left "
                        f"{len(held)} for validation and {len(train_idx)} for training: both need examples")
    train = ImageSource(source.name, source.split, source.dataset.select(train_idx), list(source.class_names),
                        prompt_template=source.prompt_template,
                        identity=None if source.identity is None else f"{source.identity}|tune-train:{fraction}:{salt}")
    return train, source.dataset.select(held)


def release_validation(validation, config: ScoreConfig, sigma: float, resolution: int, channels: int,
                       device="cpu", noise_seed: int | None = None) -> dict[str, torch.Tensor]:
    """The one private release of the score: noisy embedding sum and noisy count of the validation rows."""
    from dpdiff.data.image_sets import ImageColumn, ImageTensors
    from dpdiff.mepf.embedding import build_extractor, embedding_sums
    from dpdiff.mepf.release import add_noise, planned_releases

    emb = config.embedding()
    extractor = build_extractor(emb, batch_size=config.embed_batch_size, device=device)
    images = ImageTensors(ImageColumn(validation), resolution, channels)  # decoded a batch at a time
    sums = embedding_sums(extractor, images, None, 1, emb, config.embed_batch_size, False, "embedding validation split")
    rng = torch.Generator().manual_seed(noise_seed if noise_seed is not None else secrets.randbits(63))
    noisy = add_noise(sums, planned_releases(emb, with_validation=False), sigma, rng)
    del sums
    return noisy


def save_release(tensors: dict, path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def load_release(path) -> dict:
    return load_file(str(path))


def released_mean(tensors: dict) -> torch.Tensor:
    """Post-processing: noisy sum / max(noisy count, 1)."""
    return (tensors["sum1"][0] / tensors["counts"][0].clamp(min=1.0)).to(torch.float64)


def generated_mean(images, config: ScoreConfig, resolution: int, channels: int, device="cpu") -> torch.Tensor:
    """Mean clipped embedding of generated images (PIL), the same map as the release."""
    from dpdiff.data.transforms import images_to_tensor
    from dpdiff.mepf.embedding import build_extractor, embedding_sums

    emb = config.embedding()
    extractor = build_extractor(emb, batch_size=config.embed_batch_size, device=device)
    x = images_to_tensor(images, resolution=resolution, channels=channels)
    sums = embedding_sums(extractor, x, None, 1, emb, config.embed_batch_size, False, "embedding samples")
    return (sums.sum1[0] / sums.counts[0]).to(torch.float64)


def score_images(images, release: dict, config: ScoreConfig, resolution: int, channels: int, device="cpu") -> float:
    """Distance of the samples' mean embedding to the released one (lower is better)."""
    return float(torch.linalg.vector_norm(generated_mean(images, config, resolution, channels, device) - released_mean(release)))


@torch.no_grad()
def sample_trial(pipeline, family, prompts: list[str], labels: list[int], config: ScoreConfig, resolution: int, seed: int,
                 num_inference_steps: int, guidance_scale: float) -> list:
    """`num_samples` images, the public prompts (one per class) in turn, from a public seed."""
    turn = [i % len(prompts) for i in range(config.num_samples)]
    prompts, labels = [prompts[k] for k in turn], [labels[k] for k in turn]
    generator = torch.Generator().manual_seed(seed)
    steps = config.num_inference_steps or num_inference_steps
    scale = guidance_scale if config.guidance_scale is None else config.guidance_scale
    images = []
    for i in range(0, len(prompts), 32):
        images += family.generate(pipeline, prompts[i:i + 32], labels[i:i + 32], generator=generator,
                                  num_inference_steps=steps, guidance_scale=scale, resolution=resolution)
    return images
