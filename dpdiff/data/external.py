"""User data: an image folder on disk, or any dataset on the Hugging Face hub.

Every image is opened and decoded once before training starts, so an unreadable file is named up front
(or skipped and counted, when the user asks), never discovered an hour into a run; nothing decoded is
kept (`image_check`): the source holds paths or stored bytes, and `datasets` decodes an image when it is
read, so memory does not grow with the number of images."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from dpdiff.data.image_check import check_dataset_images, check_files, open_image
from dpdiff.data.image_source import (
    CAPTION_ONLY_CLASS,
    ImageSource,
    build_dataset,
    build_file_dataset,
    prompt_for,
    subsample,
)
from dpdiff.errors import DataError

logger = logging.getLogger(__name__)
# caption columns tried in order when --caption_column is not given ("text": diffusers' and datasets' imagefolder)
CAPTION_COLUMNS = ("prompt", "text", "caption")
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "class")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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


def load_imagefolder(path: str, split: str, limit: int | None, seed: int, skip_bad_files: bool = False,
                     image_column: str | None = None, caption_column: str | None = None) -> ImageSource:
    """`PATH/<class>/<image>` (class = sub-folder), or images with a `metadata.jsonl` giving `label`
    (int or class name) and/or a caption: `caption_column`, by default `prompt` or `text` (the
    diffusers/`datasets` imagefolder convention). Without labels the classes are the sub-folders, or
    one class when the images lie in PATH. A `PATH/<split>/` sub-folder is used when present."""
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
    in_subfolders = all(f.parent != root for f in files)
    if image_column not in (None, "image", "file_name"):
        raise DataError(f"image folder {root}: --image_column {image_column!r} does not exist; an image folder's images "
                        "are its files (column 'image', named by 'file_name' in metadata.jsonl)")
    if caption_column is not None and not metadata:
        raise DataError(f"image folder {root}: --caption_column {caption_column!r} needs a metadata.jsonl with that column "
                        "(one JSON line per image: file_name and the caption); the folder has none")
    if metadata:
        missing = [k for k in keys if k not in metadata]
        if missing:
            raise DataError(f"{len(missing)} image(s) have no line in {root / 'metadata.jsonl'}, e.g. {missing[0]}")
        columns = sorted({c for k in keys for c in metadata[k]})
        if caption_column is not None and caption_column not in columns:
            raise DataError(f"{root / 'metadata.jsonl'} has no column {caption_column!r} for --caption_column; "
                            f"its columns are {', '.join(columns)}")
        caption_key = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
        prompts = [metadata[k].get(caption_key) if caption_key else None for k in keys]
        if caption_column is not None:
            lacking = [k for k, p in zip(keys, prompts) if not isinstance(p, str)]
            if lacking:
                raise DataError(f"{root / 'metadata.jsonl'}: --caption_column {caption_column!r} must be a string on every "
                                f"line; {len(lacking)} line(s) lack it, e.g. {lacking[0]}")
        raw = [metadata[k].get("label") for k in keys]
        if all(r is None for r in raw) and (caption_key or in_subfolders):
            if in_subfolders:  # labels from the sub-folders, captions from the metadata
                class_names = sorted({f.relative_to(root).parts[0] for f in files})
                labels = [class_names.index(f.relative_to(root).parts[0]) for f in files]
            else:  # captions only (diffusers' text-to-image folders): one class
                class_names, labels = [CAPTION_ONLY_CLASS], [0] * len(files)
        else:
            if any(r is None for r in raw):
                raise DataError(f"{root / 'metadata.jsonl'}: every line needs a 'label' (an int with class names, or a "
                                f"class name), or a caption ({' or '.join(repr(c) for c in CAPTION_COLUMNS)}) on every line")
            class_names = _class_names_from_metadata(root, raw)
            labels = [r if isinstance(r, int) else class_names.index(str(r)) for r in raw]
    else:
        if not in_subfolders:
            raise DataError(f"images lie directly in {root}: put each class in its own sub-folder, or add a metadata.jsonl with labels")
        class_names = sorted({f.relative_to(root).parts[0] for f in files})
        labels = [class_names.index(f.relative_to(root).parts[0]) for f in files]
        prompts = [None] * len(files)

    idx = subsample(len(files), limit, seed)
    chosen = [files[i] for i in idx]
    kept, bad = check_files(chosen, skip_bad_files)
    if bad:
        logger.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(bad), root, bad[0])
    kept_files = [chosen[k] for k in kept]
    kept_labels = [labels[idx[k]] for k in kept]
    per_class = [prompt_for(c) for c in class_names]
    final_prompts = [prompts[idx[k]] or (per_class[l] if 0 <= l < len(per_class) else "") for k, l in zip(kept, kept_labels)]
    source = ImageSource(f"imagefolder:{path}", split, build_file_dataset(kept_files, kept_labels, class_names, final_prompts),
                         class_names, identity=files_identity(kept_files))
    source.num_skipped = len(bad)
    return source


def files_identity(files: list[Path]) -> str:
    """What the files are, without reading them: path, size and modification time of each (as make and
    `datasets` judge local files), hashed. A changed, added or removed file changes it."""
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"files:{len(files)}:{digest.hexdigest()}"


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


def _open_datasets(name: str, split: str):
    """A `datasets.Dataset`: a `save_to_disk` folder, or anything `load_dataset` reads (a hub id, a local folder)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    local = Path(name).expanduser()
    if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
        try:
            ds = load_from_disk(str(local))
        except Exception as e:
            raise DataError(f"could not load the saved dataset {name!r}: {e}") from e
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"saved dataset {name!r} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        return ds
    try:
        return load_dataset(name, split=split)
    except Exception as e:  # the hub, a typo or no network: say which name failed
        raise DataError(f"could not load dataset {name!r} split {split!r}: {e}") from e


def _to_pil(value, column: str) -> PILImage.Image:
    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import io

        if value.get("bytes"):
            with PILImage.open(io.BytesIO(value["bytes"])) as img:
                img.load()
                return img.copy()
        return open_image(Path(value["path"]))
    if isinstance(value, str):
        return open_image(Path(value))
    try:
        return PILImage.fromarray(np.asarray(value, dtype=np.uint8))
    except (TypeError, ValueError) as e:
        raise DataError(f"column {column!r} does not hold images (got {type(value).__name__}); pick the image column "
                        "with --image_column") from e


def load_hub_dataset(name: str, split: str, limit: int | None, seed: int, image_column: str | None = None,
                     caption_column: str | None = None) -> ImageSource:
    """A `datasets` dataset (hub id, local folder `load_dataset` reads, or a `save_to_disk` folder) with
    an image column and a ClassLabel column and/or a caption column (diffusers' text-to-image sets).

    Columns are autodetected (image: image/img/pixel_values; label: label/labels/class; caption:
    prompt/text/caption) unless named by `image_column` / `caption_column`. Without a ClassLabel column
    every example is one class; the captions are the prompts."""
    from datasets import ClassLabel

    ds = _open_datasets(name, split)
    columns = list(ds.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in columns:
            raise DataError(f"dataset {name!r} has no column {column!r} for {flag}; its columns are {', '.join(columns)}")
    image_col = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    caption_col = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    label_col = next((c for c in LABEL_COLUMNS if c in columns and c not in (image_col, caption_col)), None)
    if label_col is not None and not isinstance(ds.features[label_col], ClassLabel):
        if caption_col is None:
            raise DataError(f"dataset {name!r}: column {label_col!r} has no class names (not a ClassLabel); "
                            "name a caption column with --caption_column instead")
        label_col = None  # the captions condition; plain integer labels are not class names
    if image_col is None or (label_col is None and caption_col is None):
        raise DataError(f"dataset {name!r} needs an image column and a label or caption column; its columns are "
                        f"{', '.join(columns)}: name them with --image_column and --caption_column")
    idx = subsample(len(ds), limit, seed)
    ds = ds.select(idx.tolist())
    if label_col is not None:
        class_names, labels = list(ds.features[label_col].names), list(ds[label_col])
    else:
        class_names, labels = [CAPTION_ONLY_CLASS], [0] * len(ds)
    prompts = None
    if caption_col is not None:
        prompts = list(ds[caption_col])
        strict = caption_column is not None or label_col is None  # else a missing caption falls back to the class prompt
        bad = [i for i, c in enumerate(prompts) if not isinstance(c, str) and (strict or c is not None)]
        if bad:
            raise DataError(f"dataset {name!r}: caption column {caption_col!r} must hold strings; row {int(idx[bad[0]])} "
                            f"holds {type(prompts[bad[0]]).__name__}")
        prompts = [c if c is not None else prompt_for(class_names[l]) for c, l in zip(prompts, labels)]
    identity = f"datasets:{name}:{split}:{getattr(ds, '_fingerprint', None)}"
    lazy = _lazy_images(ds, image_col, name, idx)
    if lazy is None:  # arrays or other values: converted in memory (small sets)
        images = [_to_pil(im, image_col) for im in ds[image_col]]
        return ImageSource(name, split, build_dataset(images, labels, class_names, prompts), class_names, identity=identity)
    from dpdiff.data.image_source import _checked_labels, _features, _prompts

    labels = _checked_labels(labels, class_names)
    out = lazy.add_column("label", labels).add_column("prompt", _prompts(labels, class_names, prompts))
    return ImageSource(name, split, out.cast(_features(class_names)), class_names, identity=identity)


def _lazy_images(ds, image_col: str, name: str, row_ids):
    """The image column alone as a lazily decoded `datasets.Image` column named `image`, every image
    decoded once by the check (and dropped); None when the column holds neither images nor paths."""
    from datasets import Image, Value

    feature = ds.features[image_col]
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        ds = ds.cast_column(image_col, Image())
    elif not isinstance(feature, Image):
        return None
    check_dataset_images(ds, image_col, name, row_ids)
    only = ds.select_columns([image_col])
    return only if image_col == "image" else only.rename_column(image_col, "image")
