"""The one data model every loader returns: `ImageSource`, a `datasets.Dataset` with columns `image`
(a lazily decoded `datasets.Image`), `label` (`ClassLabel`) and `prompt` (str), plus the class names.

It lives apart from the loaders so that the offline sources and the user-data loaders both import it
and never each other. Images given as files stay files: `datasets` decodes one when it is read, so a
source of 100,000 images holds 100,000 paths, not 100,000 decoded images."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from dpdiff.errors import DataError

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
    unless the source carries its own (imagefolder metadata.jsonl).

    `identity`: what the images are, cheaply (the files' paths, sizes and modification times, or a
    built-in set's name and subset), for the latent cache's fingerprint; None: hash the stored images."""

    name: str
    split: str
    dataset: Dataset
    class_names: list[str]
    prompt_template: str | None = None  # None: the default captions (or the source's own)
    identity: str | None = None
    num_skipped: int = field(default=0)

    @property
    def class_prompts(self) -> list[str]:
        return [prompt_for(c, self.prompt_template, i) for i, c in enumerate(self.class_names)]

    def with_prompt_template(self, template: str) -> "ImageSource":
        """Every example captioned from its label by `template` (replacing any captions it had)."""
        check_prompt_template(template)
        self.prompt_template = template
        per_class = self.class_prompts
        # input_columns: only the label is read, no image is decoded
        self.dataset = self.dataset.map(lambda label: {"prompt": per_class[label]}, input_columns="label", desc="prompts")
        return self

    def __len__(self) -> int:
        return len(self.dataset)


def _features(class_names: list[str]) -> Features:
    return Features({"image": Image(), "label": ClassLabel(names=list(class_names)), "prompt": Value("string")})


def _checked_labels(labels, class_names: list[str]) -> list[int]:
    labels = [int(l) for l in labels]
    if not labels:
        raise DataError("the source holds no images; point it at a folder or dataset with at least one image")
    bad = sorted({l for l in labels if not 0 <= l < len(class_names)})
    if bad:
        raise DataError(f"labels {bad[:10]} have no class name (there are {len(class_names)} names); fix the labels or name every class")
    return labels


def _prompts(labels: list[int], class_names: list[str], prompts) -> list[str]:
    if prompts is None:
        per_class = [prompt_for(c) for c in class_names]
        return [per_class[l] for l in labels]
    return list(prompts)


def build_dataset(images, labels, class_names: list[str], prompts: list[str] | None = None) -> Dataset:
    """Arrays/PIL images held in memory + int labels -> the canonical `datasets.Dataset` (small built-in sets)."""
    labels = _checked_labels(labels, class_names)
    pil = [im if isinstance(im, PILImage.Image) else PILImage.fromarray(np.asarray(im)) for im in images]
    return Dataset.from_dict({"image": pil, "label": labels, "prompt": _prompts(labels, class_names, prompts)},
                             features=_features(class_names))


def build_file_dataset(files: list[Path], labels, class_names: list[str], prompts: list[str] | None = None) -> Dataset:
    """Image files + int labels -> the canonical dataset holding only the paths (decoded when read)."""
    labels = _checked_labels(labels, class_names)
    images = [{"path": str(f), "bytes": None} for f in files]
    return Dataset.from_dict({"image": images, "label": labels, "prompt": _prompts(labels, class_names, prompts)},
                             features=_features(class_names))


def subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """A seeded subset of indices (a class-balanced set on average), in a stable order."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])
