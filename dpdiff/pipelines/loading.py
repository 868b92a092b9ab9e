"""Resolve and load a base pipeline: the built-in preset, a local diffusers folder or a hub id.

The hub path is the stock `DiffusionPipeline.from_pretrained`; local folders are checked first so
that a folder that is not a diffusers pipeline gives one clear error instead of a stack trace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import deprecation_utils

from dpdiff.errors import ConfigError
from dpdiff.families import family_for_pipeline_class

PRESET_NAME = "dpdiff-tiny"
# Accelerate's --mixed_precision values -> the dtype the frozen weights are kept in
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "tiny-sd"
REQUIRED_COMPONENTS = ("unet", "vae", "scheduler")  # of the SD family; each family names its denoiser


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """`dpdiff-tiny` -> the packaged preset; an existing folder -> itself (validated); else a hub id."""
    name = str(name_or_path)
    if name == PRESET_NAME:
        if not (PRESET_DIR / "model_index.json").is_file():
            raise ConfigError(
                f"the built-in preset is missing from {PRESET_DIR}; reinstall dpdiff or build it with "
                "`python recipes/pretrain_public.py --output_dir dpdiff/presets/tiny-sd`"
            )
        return str(PRESET_DIR)
    path = Path(name).expanduser()
    if path.exists():
        validate_pipeline_folder(path)
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"model folder {name!r} does not exist; pass a diffusers pipeline folder or a hub id")
    return name


def validate_pipeline_folder(path: Path) -> None:
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise ConfigError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass a folder written by "
            "`pipeline.save_pretrained(...)`, a hub id, or 'dpdiff-tiny'"
        )
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{index} is not valid JSON ({e}); the pipeline folder is corrupt") from e
    family = family_for_pipeline_class(str(components.get("_class_name")))  # unsupported: one clear error
    required = (family.denoiser_attr, "vae", "scheduler")
    missing = [c for c in required if c not in components or not (path / c).is_dir()]
    if missing:
        raise ConfigError(f"pipeline folder {path} lacks the component(s) {missing}; a {family.name!r} pipeline needs {list(required)}")
    for component in required:
        files = os.listdir(path / component)
        if component != "scheduler" and not any(f.endswith(".safetensors") for f in files):
            raise ConfigError(
                f"{path / component} has no .safetensors weights ({files}); dpdiff loads safetensors only. "
                "Convert with `pipeline.save_pretrained(dir, safe_serialization=True)`"
            )


def load_pipeline(name_or_path: str | os.PathLike = PRESET_NAME, torch_dtype: torch.dtype = torch.float32, **kwargs):
    """The stock diffusers pipeline class for the folder/hub id, loaded from safetensors only."""
    path = resolve_model_path(name_or_path)
    class_name = _local_class_name(path)
    if class_name is None or "safety_checker" in _expected_components(class_name):
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
    # newer diffusers name it `dtype` (and warn on `torch_dtype`); older releases only know `torch_dtype`
    dtype_kw = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    kwargs[dtype_kw] = torch_dtype
    if class_name is None:  # a hub id: refuse an unsupported family before the weights download
        family_for_pipeline_class(str(DiffusionPipeline.load_config(path).get("_class_name")))
    return DiffusionPipeline.from_pretrained(path, use_safetensors=True, **kwargs)


def _local_class_name(path: str) -> str | None:
    index = Path(path) / "model_index.json"
    return str(json.loads(index.read_text()).get("_class_name")) if index.is_file() else None


def _expected_components(class_name: str) -> set[str]:
    import inspect

    import diffusers

    pipeline_class = getattr(diffusers, class_name, None)
    return set(inspect.signature(pipeline_class.__init__).parameters) if pipeline_class else set()


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the frozen weights under Accelerate's `--mixed_precision` value."""
    if precision not in WEIGHT_DTYPES:
        raise ConfigError(f"--mixed_precision {precision!r} is not supported; choose one of {list(WEIGHT_DTYPES)}")
    return WEIGHT_DTYPES[precision]


def load_dtype(precision: str, method: str, train_condition_embedder: bool = False) -> torch.dtype:
    """Load straight into the weight dtype when no pretrained weight trains (LoRA: the adapters are new,
    so host memory never holds an fp32 copy); else fp32, so trained blocks start from the exact weights."""
    return weight_dtype(precision) if method == "lora" and not train_condition_embedder else torch.float32


def cast_frozen_weights(pipeline, precision: str) -> torch.dtype:
    """Frozen parameters (denoiser base, VAE, text encoders) in the run's precision; trained ones in fp32.

    The diffusers training scripts' `weight_dtype` + `cast_training_params`: under autocast the frozen
    weights are read in bf16/fp16 anyway, so an fp32 copy only costs memory, while the trained parameters
    (and their per-example gradients, clipping, noise, optimizer state) stay fp32 master weights. A VAE whose
    config asks for `force_upcast` stays fp32 under fp16 (SD/SDXL VAEs overflow in fp16). Buffers are left
    as they are. Call it after the trainable set is chosen (`requires_grad` says what trains)."""
    dtype = weight_dtype(precision)
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            upcast = name == "vae" and dtype == torch.float16 and getattr(component.config, "force_upcast", False)
            cast_frozen(component, torch.float32 if upcast else dtype)
    return dtype


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """One module: parameters that do not train -> `dtype`, parameters that train -> fp32."""
    for p in module.parameters():
        target = torch.float32 if p.requires_grad else dtype
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
