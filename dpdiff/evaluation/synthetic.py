"""Read a synthetic labelled dataset and put its labels in the real data's class order.

Two formats, both written by `dpdiff sample`:
  - an image folder: `PATH/train/*.png` (or `PATH/*.png`) with a `metadata.jsonl` of
    `{"file_name", "label", "prompt"}` lines; class names from `PATH/sampling.json` or
    `class_names.json` when labels are integers. A folder of class sub-folders works too.
  - a `datasets` dataset saved with `save_to_disk` (columns image, label[, prompt]).

Downstream accuracy is only meaningful if synthetic label k means the real set's class k, so labels
are matched by class NAME whenever the synthetic set names its classes, and an unknown class is an
error, not a silently wrong score."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dpdiff.errors import DataError
from dpdiff.data.image_sets import ImageColumn, ImageFiles

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
NAME_FILES = ("sampling.json", "class_names.json")


@dataclass
class LabelledImages:
    """Images with labels indexed by the REAL set's `class_names`."""

    images: Sequence[Image.Image]  # decoded when read (ImageFiles / ImageColumn), or a list
    labels: np.ndarray
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)


def load_synthetic(path: str, class_names: Sequence[str]) -> LabelledImages:
    """Load the synthetic set at `path` with labels mapped onto `class_names` (the real set's)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"synthetic dataset {root} does not exist; pass the --output_dir of `dpdiff sample`")
    if not root.is_dir():
        raise DataError(f"synthetic dataset {root} must be a folder (an image folder or a save_to_disk dataset)")
    if _is_saved_dataset(root):
        images, raw_labels, names = _read_saved_dataset(root)
    else:
        images, raw_labels, names = _read_imagefolder(root)
    if not images:
        raise DataError(f"synthetic dataset {root} holds no images")
    labels = map_labels(raw_labels, names, class_names, where=str(root))
    return LabelledImages(images, labels, list(class_names), str(root))


def _normalise(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


def map_labels(raw_labels: Sequence, synthetic_names: Sequence[str] | None, real_names: Sequence[str], where: str) -> np.ndarray:
    """Raw labels (ints into `synthetic_names`, class-name strings, or bare ints) -> real indices.

    Bare ints (no names anywhere) are taken as the real set's indices, with a warning."""
    real_index = {_normalise(n): i for i, n in enumerate(real_names)}
    if len(real_index) != len(real_names):
        raise DataError(f"the real set's class names are not distinct after normalising case/space: {list(real_names)}")
    if all(isinstance(l, str) for l in raw_labels):
        names = sorted({_normalise(l) for l in raw_labels})
        unknown = [n for n in names if n not in real_index]
        if unknown:
            raise DataError(_unknown_message(where, unknown, real_names))
        return np.array([real_index[_normalise(l)] for l in raw_labels], dtype=np.int64)
    if not all(isinstance(l, (int, np.integer)) and not isinstance(l, bool) for l in raw_labels):
        kinds = sorted({type(l).__name__ for l in raw_labels})
        raise DataError(f"{where}: labels must be all integers or all class names, got {kinds}")
    ints = np.asarray(raw_labels, dtype=np.int64)
    if synthetic_names is None:
        bad = sorted({int(l) for l in ints if not 0 <= l < len(real_names)})
        if bad:
            raise DataError(
                f"{where}: labels {bad[:10]} lie outside the real set's {len(real_names)} classes "
                f"({', '.join(real_names)}); the synthetic set must be sampled from a model of the same classes"
            )
        logger.warning("%s names no classes: integer labels are taken as the real set's class indices", where)
        return ints
    outside = sorted({int(l) for l in ints if not 0 <= l < len(synthetic_names)})
    if outside:
        raise DataError(f"{where}: labels {outside[:10]} have no class name (the set names {len(synthetic_names)} classes)")
    used = sorted({int(l) for l in ints})
    unknown = [synthetic_names[l] for l in used if _normalise(synthetic_names[l]) not in real_index]
    if unknown:
        raise DataError(_unknown_message(where, unknown, real_names))
    lookup = np.array([real_index.get(_normalise(n), -1) for n in synthetic_names], dtype=np.int64)
    return lookup[ints]


def _unknown_message(where: str, unknown: Sequence[str], real_names: Sequence[str]) -> str:
    return (
        f"{where}: classes {list(unknown)[:10]} are not classes of the real set ({', '.join(real_names)}); "
        "evaluate against the dataset the generator was trained on"
    )


def _is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or ((root / "state.json").is_file() and (root / "dataset_info.json").is_file())


def _read_saved_dataset(root: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:  # corrupt arrow files, version mismatch: name the folder
        raise DataError(f"cannot read the saved dataset at {root}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise DataError(f"{root} holds splits {list(ds)}; save the synthetic set as one split (or name it 'train')")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    missing = [c for c in ("image", "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"saved dataset {root} lacks column(s) {missing}; it needs 'image' and 'label' (it has {ds.column_names})")
    feature = ds.features["label"]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else _names_from_files(root)
    if isinstance(ds.features["image"], datasets.Image):  # decoded when read; each checked once now
        from dpdiff.data.image_check import check_dataset_images

        check_dataset_images(ds, "image", f"saved dataset {root}")
        return ImageColumn(ds.select_columns(["image"])), list(ds["label"]), names
    images = []  # arrays, not an Image column: converted as they are (no file to re-read)
    try:
        for im in ds["image"]:
            images.append(im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)))
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
        raise DataError(f"saved dataset {root}: an image cannot be decoded ({e})") from e
    return images, list(ds["label"]), names


def _names_from_files(root: Path) -> list[str] | None:
    for name in NAME_FILES:
        path = root / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} is not valid JSON ({e})") from e
            names = data.get("class_names") if isinstance(data, dict) else data
            if names is not None:
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise DataError(f"{path}: class names must be a JSON list of strings")
                return names
    return None


def _read_imagefolder(root: Path):
    """metadata.jsonl in PATH or PATH/train; else class sub-folders."""
    folder = root / "train" if (root / "train" / "metadata.jsonl").is_file() and not (root / "metadata.jsonl").is_file() else root
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        rows = _read_metadata(meta)
        names = _names_from_files(folder) or _names_from_files(root)
        return _checked([folder / row["file_name"] for row in rows]), [row["label"] for row in rows], names
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(folder).parts)]
    if not files:
        raise DataError(f"{folder} holds no images and no metadata.jsonl; pass the output folder of `dpdiff sample`")
    if any(f.parent == folder for f in files):
        raise DataError(f"images lie directly in {folder} without a metadata.jsonl: add one (file_name, label) or use class sub-folders")
    return _checked(files), [f.relative_to(folder).parts[0] for f in files], None


def _read_metadata(meta: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row["file_name"], row["label"]  # noqa: B018 - both keys are required
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{meta}:{lineno}: each line must be a JSON object with 'file_name' and 'label' ({e})") from e
        rows.append(row)
    if not rows:
        raise DataError(f"{meta} has no lines: the synthetic set is empty")
    return rows


def _checked(paths: list[Path]) -> ImageFiles:
    """Every file decoded once now (a truncated or missing one is named here), then read again when used:
    the set's memory does not grow with its size."""
    from dpdiff.data.image_check import check_files

    check_files(paths, skip_bad_files=False, advice="Every file the synthetic set lists must decode: regenerate it "
                "with `dpdiff sample` or fix metadata.jsonl")
    return ImageFiles(paths)
