"""Sampling a trained MEPF generator into the dataset format the diffusion recipes write."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from dpdiff.data.transforms import tensor_to_images
from dpdiff.errors import ConfigError
from dpdiff.mepf.generator import CONFIG_FILE, GENERATOR_DIR, load_generator


def resolve_generator_dir(model_dir: str | os.PathLike) -> Path:
    """Accept a run's output folder (holding generator/) or the generator folder itself."""
    path = Path(model_dir)
    return path / GENERATOR_DIR if (path / GENERATOR_DIR / CONFIG_FILE).is_file() else path


@torch.no_grad()
def sample_mepf(model_dir: str | os.PathLike, num_per_class: int, seed: int = 0, batch_size: int = 500) -> tuple[list[Image.Image], list[int], list[str]]:
    """`num_per_class` images of every class -> (PIL images, labels, class names), class by class."""
    if num_per_class < 1:
        raise ConfigError(f"num_per_class must be >= 1, got {num_per_class}")
    model = load_generator(resolve_generator_dir(model_dir))
    cfg = model.config
    labels = torch.arange(cfg.num_classes).repeat_interleave(num_per_class)
    rng = torch.Generator().manual_seed(seed)
    images = []
    for chunk in labels.split(batch_size):
        images.extend(tensor_to_images(model.sample(chunk, generator=rng), channels=cfg.channels))
    names = list(cfg.class_names) or [str(c) for c in range(cfg.num_classes)]
    return images, labels.tolist(), names
