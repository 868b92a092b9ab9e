"""The family registry: pipeline class (model_index.json `_class_name`) or denoiser class -> family.

Families register themselves with `@register_family`; `dpdiff.families` imports every family module."""

from __future__ import annotations

import json
from pathlib import Path

from dpdiff.errors import ConfigError

_FAMILIES: dict[str, object] = {}


def register_family(cls):
    """Class decorator: one instance of `cls` serves every pipeline/denoiser class it names."""
    family = cls()
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return cls


def families() -> dict[str, object]:
    return dict(_FAMILIES)


def supported_pipelines() -> list[str]:
    return sorted(c for f in _FAMILIES.values() for c in f.pipeline_classes)


def family_named(name: str):
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; dpdiff supports {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def family_for_pipeline_class(class_name: str):
    for family in _FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    raise ConfigError(
        f"pipeline class {class_name!r} is not supported by dpdiff; supported pipelines: {supported_pipelines()}. "
        "Fine-tune one of these families, or add a family module under dpdiff/families/"
    )


def family_for_pipeline(pipeline):
    return family_for_pipeline_class(type(pipeline).__name__)


def family_for_folder(path: str | Path):
    """The family of a local pipeline folder, read from its model_index.json (before loading anything)."""
    index = Path(path) / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {index} ({e}); the pipeline folder is corrupt") from e
    return family_for_pipeline_class(str(class_name))


def family_for_denoiser(model):
    """The family whose denoiser class `model` (bare, not wrapped) is; several families may share a
    denoiser class, then the first registered one's conditioning applies (same call signature)."""
    name = type(model).__name__
    for family in _FAMILIES.values():
        if name in family.denoiser_classes:
            return family
    known = sorted({c for f in _FAMILIES.values() for c in f.denoiser_classes})
    raise ConfigError(f"denoiser class {name!r} belongs to no supported model family; supported denoisers: {known}")
