"""What a latent cache depends on, so that a cache is reused only where it holds exactly the latents and
conditionings a fresh encoding would give: the data (images, captions, labels, their order), the frozen
encoders (model, configs, a digest of their weights, dtypes), the resolution, the flip, the family."""

from __future__ import annotations

import hashlib
import json

import torch

from dpdiff.errors import DataError


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def data_identity(source) -> str:
    """The source's own cheap identity (files' paths, sizes, mtimes; a built-in set and subset), else a
    hash of every stored image's bytes, read a chunk at a time without decoding."""
    if source.identity:
        return source.identity
    from datasets import Image

    column = source.dataset.select_columns(["image"])
    if isinstance(column.features["image"], Image):
        column = column.cast_column("image", Image(decode=False))
    digest = hashlib.sha256()
    for start in range(0, len(column), 1024):
        for value in column[start : start + 1024]["image"]:
            if isinstance(value, dict):
                digest.update(value.get("bytes") or str(value.get("path")).encode())
            else:
                digest.update(repr(value).encode())
    return f"bytes:{digest.hexdigest()}"


def _weights_digest(module: torch.nn.Module) -> str:
    """A cheap digest of a frozen model's weights: its first and last tensors and every tensor's shape."""
    tensors = list(module.state_dict().items())
    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    for _, t in tensors[:1] + tensors[-1:]:  # a strided sample: a few thousand values, not a 0.5 GB embedding
        flat = t.detach().reshape(-1)
        digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def encoders_identity(pipeline, family) -> dict:
    """Every frozen component that encodes (VAE, text encoders, tokenizers): class, config, weights, dtype."""
    out = {"pipeline": type(pipeline).__name__, "name_or_path": str(getattr(pipeline, "name_or_path", "") or "")}
    for name, component in sorted(pipeline.components.items()):
        if name == family.denoiser_attr or component is None:
            continue
        if isinstance(component, torch.nn.Module):
            config = getattr(component, "config", None) or {}
            config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            out[name] = {"class": type(component).__name__, "config": _digest(config), "dtype": str(component.dtype),
                         "weights": _weights_digest(component)}
        elif hasattr(component, "get_vocab"):  # a tokenizer
            out[name] = {"class": type(component).__name__, "vocab": len(component.get_vocab()),
                         "max_length": getattr(component, "model_max_length", None)}
    return out


def cache_fingerprint(source, pipeline, family, resolution: int, random_flip: bool, keys: list) -> dict:
    """The parts of the fingerprint by name (a mismatch names the parts that differ) and their hash."""
    labels = [int(l) for l in source.dataset["label"]]
    parts = {
        "data": data_identity(source),
        "captions": _digest(list(source.dataset["prompt"])),
        "labels": _digest(labels),
        "conditioning": _digest(keys),
        "encoders": _digest(encoders_identity(pipeline, family)),
        "family": family.name,
        "resolution": int(resolution),
        "random_flip": bool(random_flip),
        "examples": len(labels),
    }
    return {"parts": parts, "hash": _digest(parts)}


def check_matches(stored: dict, wanted: dict, folder) -> None:
    """One clear error when a cache was built from other data, encoders or settings."""
    if stored.get("hash") == wanted["hash"]:
        return
    differ = sorted(k for k in wanted["parts"] if stored.get("parts", {}).get(k) != wanted["parts"][k])
    raise DataError(
        f"the latent cache in {folder} was built for other {', '.join(differ) or 'settings'} than this run "
        f"(it holds {stored.get('parts', {}).get('examples', '?')} examples at resolution "
        f"{stored.get('parts', {}).get('resolution', '?')}); a cache is reused only for the same data, base model, "
        "resolution, flip and family. Use another --cache_dir, or delete that folder to encode again")
