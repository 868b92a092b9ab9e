"""Training checkpoints: trained weights, optimizer, EMA, the DP engine's generator states and the
privacy ledger, written atomically with a checksum manifest.

A resumed run continues the SAME ledger: epsilon never restarts from zero. A corrupt or truncated
checkpoint is refused by name (the manifest's sha256 does not match); older checkpoints stay usable.
Checkpoints hold the secret sampling/noise generator states: keep them as private as the data
(they are never pushed to the hub)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpdiff.errors import IntegrityError
from dpdiff.io import atomic_dir, sha256_file, write_json

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(output_dir: str | os.PathLike, step: int, trainable: dict[str, torch.Tensor], state: dict,
                    ledger_state: dict, total_limit: int | None = 2) -> Path:
    """Write `checkpoints/checkpoint-<step>/` atomically; drop the oldest beyond `total_limit`."""
    root = Path(output_dir) / CHECKPOINTS
    target = root / f"checkpoint-{step}"
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
        write_json(tmp / "ledger.json", ledger_state)
        files = sorted(p.name for p in tmp.iterdir())
        write_json(tmp / MANIFEST, {"step": step, "sha256": {f: sha256_file(tmp / f) for f in files}})
    if total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step a `checkpoint-<step>` folder was written at; None for any other name."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders by step, oldest first (temporary folders of an interrupted write excluded)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if (step := checkpoint_step(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> None:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise IntegrityError(f"checkpoint {path} has no {MANIFEST}: it is incomplete or not a dpdiff checkpoint")
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError) as e:
        raise IntegrityError(f"checkpoint {path}: unreadable {MANIFEST} ({e})") from e
    for name, digest in expected.items():
        f = path / name
        if not f.is_file() or sha256_file(f) != digest:
            raise IntegrityError(f"checkpoint file {f} is missing, corrupt or truncated (checksum mismatch)")


def resolve_checkpoint(output_dir: str | os.PathLike, which: str) -> Path:
    """'latest' -> newest checkpoint of output_dir; else a path. Verified before use."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise IntegrityError(f"--resume_from_checkpoint latest: no checkpoint in {Path(output_dir) / CHECKPOINTS}")
        path = found[-1]
        try:
            verify_checkpoint(path)
        except IntegrityError as e:
            older = [str(p) for p in found[:-1]]
            hint = f"; resume from the previous good one with --resume_from_checkpoint {older[-1]}" if older else ""
            raise IntegrityError(f"{e}{hint}") from None
        return path
    path = Path(which)
    if not path.is_dir():
        path = Path(output_dir) / CHECKPOINTS / which
    if not path.is_dir():
        raise IntegrityError(f"checkpoint {which!r} not found (looked in {Path(output_dir) / CHECKPOINTS})")
    verify_checkpoint(path)
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable weights, state, ledger state) of a verified checkpoint; tensors only, no pickled code."""
    verify_checkpoint(path)
    trainable = load_file(str(path / "trainable.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    ledger_state = json.loads((path / "ledger.json").read_text())
    return trainable, state, ledger_state
