"""User data: an image folder on disk, or any dataset on the Hugging Face hub.

Every image is opened and decoded before training starts, so an unreadable file is named up front
(or skipped and counted, when the user asks), never discovered an hour into a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from dpdiff.data.sources import ImageSource, _subsample, build_dataset
from dpdiff.errors import DataError

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _open_image(path: Path) -> PILImage.Image:
    """Open and fully decode one file (a truncated file fails here, not later)."""
    if path.stat().st_size == 0:
        raise DataError(f"image file {path} is empty (0 bytes)")
    try:
        with PILImage.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image file {path}: {e}") from e


def _read_metadata(root: Path) -> dict[str, dict]:
    meta = root / "metadata.jsonl"
    rows = {}
    if meta.is_file():
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[row["file_name"]] = row
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{meta}:{lineno}: each line must be a JSON object with a 'file_name' ({e})") from e
    return rows


def load_imagefolder(path: str, split: str, limit: int | None, seed: int, skip_bad_files: bool = False) -> ImageSource:
    """`PATH/<class>/<image>` (class = sub-folder), or images with a `metadata.jsonl` giving `label`
    (int or class name) and optionally `prompt`. A `PATH/<split>/` sub-folder is used when present."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    if (root / split).is_dir():
        root = root / split
    metadata = _read_metadata(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(root).parts)]
    if not files:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    keys = [str(f.relative_to(root)) for f in files]
    if metadata:
        missing = [k for k in keys if k not in metadata]
        if missing:
            raise DataError(f"{len(missing)} image(s) have no line in {root / 'metadata.jsonl'}, e.g. {missing[0]}")
        raw = [metadata[k].get("label") for k in keys]
        if any(r is None for r in raw):
            raise DataError(f"{root / 'metadata.jsonl'}: every line needs a 'label' (an int with class names, or a class name)")
        class_names = _class_names_from_metadata(root, raw)
        labels = [r if isinstance(r, int) else class_names.index(str(r)) for r in raw]
        prompts = [metadata[k].get("prompt") for k in keys]
    else:
        if any(f.parent == root for f in files):
            raise DataError(f"images lie directly in {root}: put each class in its own sub-folder, or add a metadata.jsonl with labels")
        class_names = sorted({f.relative_to(root).parts[0] for f in files})
        labels = [class_names.index(f.relative_to(root).parts[0]) for f in files]
        prompts = [None] * len(files)

    idx = _subsample(len(files), limit, seed)
    images, kept_labels, kept_prompts, bad = [], [], [], []
    for i in idx:
        try:
            images.append(_open_image(files[i]))
        except DataError as e:
            if not skip_bad_files:
                raise DataError(f"{e}. Remove or fix it, or pass --skip_bad_files to skip unreadable images") from None
            bad.append(files[i])
            continue
        kept_labels.append(labels[i])
        kept_prompts.append(prompts[i])
    if bad:
        logger.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(bad), root, bad[0])
    from dpdiff.data.sources import prompt_for

    per_class = [prompt_for(c) for c in class_names]
    final_prompts = [p if p else (per_class[l] if 0 <= l < len(per_class) else "") for p, l in zip(kept_prompts, kept_labels)]
    source = ImageSource(f"imagefolder:{path}", split, build_dataset(images, kept_labels, class_names, final_prompts), class_names)
    source.num_skipped = len(bad)
    return source


def _class_names_from_metadata(root: Path, raw_labels: list) -> list[str]:
    names_file = root / "class_names.json"
    if names_file.is_file():
        return list(json.loads(names_file.read_text()))
    if all(isinstance(r, str) for r in raw_labels):
        return sorted(set(raw_labels))
    raise DataError(
        f"{root / 'metadata.jsonl'} has integer labels but no class names: add {names_file} "
        "(a JSON list, index = label) or use class names as labels"
    )


def load_hub_dataset(name: str, split: str, limit: int | None, seed: int) -> ImageSource:
    """Any hub dataset with an image column and a ClassLabel column (what users with the hub use)."""
    from datasets import ClassLabel, load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # the hub, a typo or no network: say which name failed
        raise DataError(f"could not load dataset {name!r} split {split!r} from the hub: {e}") from e
    image_col = next((c for c in ("image", "img", "pixel_values") if c in ds.column_names), None)
    label_col = next((c for c in ("label", "labels", "class") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise DataError(f"dataset {name!r} needs an image column and a label column; it has {ds.column_names}")
    feature = ds.features[label_col]
    if not isinstance(feature, ClassLabel):
        raise DataError(f"dataset {name!r}: column {label_col!r} has no class names (not a ClassLabel)")
    idx = _subsample(len(ds), limit, seed)
    ds = ds.select(idx.tolist())
    prompts = ds["prompt"] if "prompt" in ds.column_names else None
    images = [np.asarray(im) if not isinstance(im, PILImage.Image) else im for im in ds[image_col]]
    return ImageSource(name, split, build_dataset(images, ds[label_col], feature.names, prompts), list(feature.names))
