"""Datasets -> {image, label, prompt}: offline sources, user folders, hub datasets; transforms."""

from __future__ import annotations

from dpdiff.data import sources
from dpdiff.data.sources import ImageSource, prompt_for
from dpdiff.data.transforms import check_resolution
from dpdiff.errors import DataError

OFFLINE_SOURCES = ("fashion_mnist", "mnist5k", "animal_mnist")


def load_source(
    name: str,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    skip_bad_files: bool = False,
    prompt_template: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    resolution: int | None = None,
) -> ImageSource:
    """`fashion_mnist` | `mnist5k` | `animal_mnist` | `imagefolder:PATH` | a `datasets` id or folder
    (hub id, a folder `load_dataset` reads, or a `save_to_disk` folder).

    `limit` takes a seeded random subset (tests, quick runs); `prompt_template` captions every
    example from its label ({class_name}, {article}, {label}), e.g. "a photo of {article} {class_name}".
    `image_column` / `caption_column` name a `datasets` set's columns (default: autodetected; the
    caption of an imagefolder is its metadata.jsonl's `prompt` or `text`). `resolution`, when given, is
    the size the images will be trained at: checked here, before any data is read."""
    if resolution is not None:
        check_resolution(resolution)
    if prompt_template is not None:
        sources.check_prompt_template(prompt_template)  # before the data is read
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and (not isinstance(column, str) or not column):
            raise DataError(f"{flag} must be a column name, got {column!r}")
    source = _load(name, split, limit, seed, skip_bad_files, image_column, caption_column)
    return source if prompt_template is None else source.with_prompt_template(prompt_template)


def _load(name: str, split: str, limit: int | None, seed: int, skip_bad_files: bool,
          image_column: str | None = None, caption_column: str | None = None) -> ImageSource:
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
        wanted = {"--image_column": (image_column, "image"), "--caption_column": (caption_column, "prompt")}
        for flag, (column, own) in wanted.items():
            if column is not None and column != own:
                raise DataError(f"{name} has no column {column!r} for {flag}; its columns are {', '.join(sources.COLUMNS)} "
                                f"({flag} {own} or leave it out)")
        return loaders[name](split, limit, seed)
    if name.startswith("imagefolder:"):
        return external.load_imagefolder(name.split(":", 1)[1], split, limit, seed, skip_bad_files, image_column, caption_column)
    return external.load_hub_dataset(name, split, limit, seed, image_column, caption_column)


__all__ = ["DataError", "ImageSource", "OFFLINE_SOURCES", "check_resolution", "load_source", "prompt_for"]
