"""What a fine-tuning run leaves behind, read and checked in one place (sampling and the model card).

A run folder (local, or a hub repo fetched into the cache) holds `privacy.json` (the guarantee),
`generation_config.json` (how to sample: base model, classes, prompts, resolution, channels) and
the trained weights: `pytorch_lora_weights.safetensors` (lora), `unet/` (attention, full) or the
MEPF generator. Nothing is sampled or published from a folder whose privacy record is missing or
broken: the guarantee is the product, so its absence is an error, not a warning."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpdiff.errors import ConfigError, IntegrityError, PrivacyError

from dpdiff.run_files import (  # noqa: F401  (re-exported: the run folder's names)
    DENOISER_DIRS,
    GENERATION_FILE,
    LORA_FILE,
    PRIVACY_FILE,
    TRANSFORMER_DIR,
    UNET_DIR,
)

METHODS = ("lora", "attention", "full", "mepf")
DP_SGD_METHODS = ("lora", "attention", "full")

# the fields of a DP-SGD guarantee a reader needs to check it (all stated on the model card)
DP_SGD_PRIVACY_KEYS = (
    "epsilon",
    "delta",
    "accountant",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "steps",
    "noise_multiplicity",
    "batch_size",
    "num_examples",
    "neighbouring_relation",
    "method",
    "trainable_parameters",
    "base_model",
    "dataset",
)
GENERATION_KEYS = ("base_model", "method", "class_names", "class_prompts", "resolution", "channels")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class RunRecord:
    """A checked run folder: its privacy record and (for diffusion methods) its generation config."""

    path: Path
    privacy: dict[str, Any]
    generation: dict[str, Any]

    @property
    def method(self) -> str:
        return self.privacy["method"]

    @property
    def class_names(self) -> list[str]:
        return list(self.generation.get("class_names", []))

    @property
    def class_prompts(self) -> list[str]:
        return list(self.generation.get("class_prompts", []))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing; is {path.parent} the output folder of a dpdiff run?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON ({e}); the run folder is corrupt, re-export it") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_run(run_dir: str | os.PathLike, strict_privacy: bool = False) -> RunRecord:
    """Read and check a local run folder.

    `strict_privacy` (the model card) also demands every DP-SGD field, so the published statement is
    complete; sampling needs only a valid epsilon/delta and the method."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"run folder {path} does not exist; pass the --output_dir of a fine-tuning run or a hub id")
    privacy = read_json(path / PRIVACY_FILE)
    check_privacy(privacy, path / PRIVACY_FILE, strict=strict_privacy)
    method = privacy["method"]
    generation: dict[str, Any] = {}
    if method != "mepf" or (path / GENERATION_FILE).exists():
        generation = read_json(path / GENERATION_FILE)
        check_generation(generation, path / GENERATION_FILE, method)
    check_weights(path, method)
    return RunRecord(path=path, privacy=privacy, generation=generation)


def check_privacy(privacy: dict[str, Any], where: Path, strict: bool = False) -> None:
    method = privacy.get("method")
    if method not in METHODS:
        raise IntegrityError(f"{where}: 'method' must be one of {list(METHODS)}, got {method!r}")
    for key in ("epsilon", "delta"):
        if key not in privacy:
            raise PrivacyError(f"{where} has no {key!r}: without it the run carries no stated guarantee")
    eps, delta = privacy["epsilon"], privacy["delta"]
    if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
        raise PrivacyError(f"{where}: epsilon must be a finite positive number, got {eps!r}")
    if not _is_number(delta) or not 0 < delta < 1:
        raise PrivacyError(f"{where}: delta must be in (0, 1), got {delta!r}")
    if strict and method in DP_SGD_METHODS:
        missing = [k for k in DP_SGD_PRIVACY_KEYS if k not in privacy]
        if missing:
            raise PrivacyError(f"{where} lacks {missing}; the model card must state the whole guarantee. Re-export the run")


def check_generation(gen: dict[str, Any], where: Path, method: str) -> None:
    missing = [k for k in GENERATION_KEYS if k not in gen and not (method == "mepf" and k == "base_model")]
    if missing:
        raise IntegrityError(f"{where} lacks {missing}; re-export the run with a current dpdiff")
    if gen.get("method", method) != method:
        raise IntegrityError(f"{where} says method {gen['method']!r} but privacy.json says {method!r}; the folder mixes two runs")
    names, prompts = gen["class_names"], gen["class_prompts"]
    if not isinstance(names, list) or not isinstance(prompts, list) or len(names) != len(prompts):
        raise IntegrityError(f"{where}: class_names and class_prompts must be lists of equal length")
    if gen["channels"] not in (1, 3):
        raise IntegrityError(f"{where}: channels must be 1 or 3, got {gen['channels']!r}")
    if not isinstance(gen["resolution"], int) or gen["resolution"] <= 0:
        raise IntegrityError(f"{where}: resolution must be a positive integer, got {gen['resolution']!r}")


def check_weights(path: Path, method: str) -> None:
    if method == "lora" and not (path / LORA_FILE).is_file():
        raise IntegrityError(f"{path} is a lora run but has no {LORA_FILE}")
    if method in ("attention", "full"):
        folders = [path / d for d in DENOISER_DIRS if (path / d).is_dir()]
        denoiser = folders[0] if folders else path / UNET_DIR
        if not (denoiser / "config.json").is_file() or not any(p.suffix == ".safetensors" for p in denoiser.glob("*")):
            raise IntegrityError(f"{path} is a {method} run but {denoiser} has no config.json + .safetensors weights")
    files = [path / LORA_FILE] if method == "lora" else sorted(denoiser.glob("*.safetensors")) if method in ("attention", "full") else []
    for weights in files:
        check_safetensors(weights)


def check_safetensors(path: Path) -> None:
    """Open the header: safetensors checks it against the file size, so a truncated or corrupt file is
    named here, not as a stack trace later (no need to read the tensors themselves)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise IntegrityError(f"weights file {path} is corrupt or truncated ({e}); re-export or re-download the run") from None


def resolve_run(run_dir_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; `owner/name` that is not a folder -> a snapshot from the hub."""
    name = str(run_dir_or_hub_id)
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(name):
        raise ConfigError(f"run folder {name!r} does not exist and is not a hub id (owner/name)")
    import huggingface_hub

    try:
        local = huggingface_hub.snapshot_download(repo_id=name, ignore_patterns=["checkpoints/*", "*.tmp"])
    except Exception as e:  # offline, missing repo, no access: one actionable message
        raise ConfigError(
            f"{name!r} is not a local folder, and downloading it as a hub repo id failed ({type(e).__name__}: {e}); "
            "check the path, or the repo id and your access (and HF_HUB_OFFLINE)"
        ) from e
    return Path(local)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
