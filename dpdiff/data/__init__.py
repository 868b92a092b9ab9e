"""Datasets -> {image, label, prompt}: offline sources, user folders, hub datasets; transforms."""

from __future__ import annotations

from dpdiff.data.sources import ImageSource, prompt_for
from dpdiff.errors import DataError

OFFLINE_SOURCES = ("fashion_mnist", "mnist5k", "animal_mnist")


def load_source(name: str, split: str = "train", limit: int | None = None, seed: int = 0, skip_bad_files: bool = False) -> ImageSource:
    """`fashion_mnist` | `mnist5k` | `animal_mnist` | `imagefolder:PATH` | a hub dataset id.

    `limit` takes a seeded random subset (tests, quick runs)."""
    from dpdiff.data import external, sources

    if not name:
        raise DataError("no dataset given: use fashion_mnist, mnist5k, animal_mnist, imagefolder:PATH or a hub id")
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    loaders = {
        "fashion_mnist": sources.load_fashion_mnist,
        "mnist5k": sources.load_mnist5k,
        "animal_mnist": sources.load_animal_mnist,
    }
    if name in loaders:
        return loaders[name](split, limit, seed)
    if name.startswith("imagefolder:"):
        return external.load_imagefolder(name.split(":", 1)[1], split, limit, seed, skip_bad_files)
    return external.load_hub_dataset(name, split, limit, seed)


__all__ = ["DataError", "ImageSource", "OFFLINE_SOURCES", "load_source", "prompt_for"]
