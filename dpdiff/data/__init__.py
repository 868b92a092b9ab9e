"""Datasets -> {image, label, prompt}: offline sources, user folders, hub datasets; transforms."""

from __future__ import annotations

from dpdiff.data import sources
from dpdiff.data.sources import ImageSource, prompt_for
from dpdiff.errors import DataError

OFFLINE_SOURCES = ("fashion_mnist", "mnist5k", "animal_mnist")


def load_source(
    name: str,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    skip_bad_files: bool = False,
    prompt_template: str | None = None,
) -> ImageSource:
    """`fashion_mnist` | `mnist5k` | `animal_mnist` | `imagefolder:PATH` | a hub dataset id.

    `limit` takes a seeded random subset (tests, quick runs); `prompt_template` captions every
    example from its label ({class_name}, {article}, {label}), e.g. "a photo of {article} {class_name}"."""
    if prompt_template is None:
        return _load(name, split, limit, seed, skip_bad_files)
    sources.check_prompt_template(prompt_template)  # before the data is read
    return _load(name, split, limit, seed, skip_bad_files).with_prompt_template(prompt_template)


def _load(name: str, split: str, limit: int | None, seed: int, skip_bad_files: bool) -> ImageSource:
    from dpdiff.data import external

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
