"""Fréchet distance between real and synthetic images on pretrained features.

The offline default embeds images with ImageNet EfficientNet-Lite0 (1280-d pooled features,
`dpdiff.features`). Its numbers are NOT FID: FID is defined on Inception-v3 pool3 features, and
the two scales differ. We call ours "FD (EfficientNet-Lite0)" everywhere and state the sample
counts and preprocessing next to every value, because the Fréchet distance is biased by the sample
size (a smaller N gives a larger FD) and changes with resizing. Inception FID is offered when the
user has torchmetrics + torch-fidelity with weights available.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from dpdiff.errors import ConfigError, DataError

FD_NAME = "FD (EfficientNet-Lite0)"


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two Gaussians.

    The trace of (S1 S2)^{1/2} equals the trace of (S1^{1/2} S2 S1^{1/2})^{1/2}, a symmetric PSD
    matrix, so it is computed with two symmetric eigendecompositions in float64: no complex
    round-off from a general matrix square root, and rank-deficient covariances (N < feature
    dimension) need no eps offset."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise DataError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DataError(f"covariances must be {d}x{d}, got {sigma1.shape} and {sigma2.shape}")
    for what, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{what} holds NaN or inf: the features (or the images) are not finite")
    sqrt_sigma1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
    middle = sqrt_sigma1 @ ((sigma2 + sigma2.T) / 2) @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))  # round-off can push an exact 0 to -1e-12


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def feature_statistics(images: torch.Tensor, extractor, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of `extractor.pooled` features of `images`
    ([N, C, H, W] in [-1, 1]; the extractor resizes and normalises)."""
    if images.ndim != 4 or len(images) < 2:
        raise DataError(f"feature statistics need a [N, C, H, W] tensor with N >= 2 images, got shape {tuple(images.shape)}")
    features = extractor.pooled(images, batch_size=batch_size).double().numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False)


def load_statistics(path: str | os.PathLike, key: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) saved by `save_statistics` under the same `key` (what the images and the extractor
    were), or None when `path` does not exist. A file of other settings is an error, never a silent
    mismatch: an FD against the wrong reference looks like any other number."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            saved_key, mu, sigma = json.loads(str(saved["key"])), saved["mu"], saved["sigma"]
    except Exception as e:  # not an npz, or one without our fields
        raise ConfigError(f"{path} is not a feature-statistics file written by dpdiff ({type(e).__name__}: {e}); "
                          "delete it or give another path") from e
    if saved_key != key:
        differ = sorted(k for k in {*key, *saved_key} if key.get(k) != saved_key.get(k))
        raise ConfigError(f"{path} holds the statistics of other settings ({', '.join(f'{k}: saved {saved_key.get(k)!r}, now {key.get(k)!r}' for k in differ)}); "
                          "delete it or give another path")
    return mu, sigma


def save_statistics(path: str | os.PathLike, key: dict, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write (mu, sigma) with the `key` they belong to, atomically (no half-written cache)."""
    from dpdiff.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, key=np.array(json.dumps(key, sort_keys=True)), mu=mu, sigma=sigma)


def cached_statistics(images: torch.Tensor, extractor, path, key: dict, batch_size: int | None = None) -> tuple[tuple, bool]:
    """((mu, sigma), reused): from `path` when it holds them under `key`, else computed and saved there."""
    cached = load_statistics(path, key)
    if cached is not None:
        return cached, True
    stats = feature_statistics(images, extractor, batch_size)
    save_statistics(path, key, *stats)
    return stats, False


def fd_description(num_real: int, num_synthetic: int, resolution: int, channels: int, input_size: int, real_split: str | None = None) -> str:
    """The label printed next to every FD value, e.g.
    'FD (EfficientNet-Lite0), 10000 real (test) vs 10000 synthetic, 28x28 grey -> 224 bilinear'."""
    split = f" ({real_split})" if real_split else ""
    colour = "grey" if channels == 1 else "RGB"
    return f"{FD_NAME}, {num_real} real{split} vs {num_synthetic} synthetic, {resolution}x{resolution} {colour} -> {input_size} bilinear"


def compute_fd(real_images: torch.Tensor, synthetic_images: torch.Tensor, extractor, batch_size: int | None = None,
               real_split: str | None = None, real_statistics: tuple | None = None) -> dict:
    """FD between two image tensors of the same format; returns the value and its description.
    `real_statistics`: the real side's (mu, sigma) from an earlier run on these same images (not recomputed)."""
    if real_images.shape[1:] != synthetic_images.shape[1:]:
        raise DataError(
            f"real {tuple(real_images.shape[1:])} and synthetic {tuple(synthetic_images.shape[1:])} images differ in format; "
            "convert both with dpdiff.data.transforms.images_to_tensor first"
        )
    mu_r, sigma_r = real_statistics if real_statistics is not None else feature_statistics(real_images, extractor, batch_size)
    mu_s, sigma_s = feature_statistics(synthetic_images, extractor, batch_size)
    channels, resolution = real_images.shape[1], real_images.shape[-1]
    return {
        "value": frechet_distance(mu_r, sigma_r, mu_s, sigma_s),
        "metric": FD_NAME,
        "num_real": len(real_images),
        "num_synthetic": len(synthetic_images),
        "description": fd_description(len(real_images), len(synthetic_images), resolution, channels, extractor.input_size, real_split),
    }


def check_inception_available():
    """Import torchmetrics' FID class or say what to install (called before any work starts)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except Exception as e:  # ImportError, or a torchmetrics built against another torch
        raise ConfigError(
            "Inception FID needs torchmetrics and torch-fidelity (pip install torchmetrics torch-fidelity) and the "
            f"Inception weights (downloaded on first use); importing them failed: {e}. "
            f"Use the offline metric 'fd' ({FD_NAME}) instead."
        ) from e
    return FrechetInceptionDistance


def inception_fid(real_images: torch.Tensor, synthetic_images: torch.Tensor, device: str | torch.device = "cpu") -> dict:
    """The standard Inception-v3 FID via torchmetrics (needs torch-fidelity and its weights, which
    are downloaded on first use). Images [N, C, H, W] in [-1, 1]; grey is repeated to RGB and
    torchmetrics resizes to 299."""
    FrechetInceptionDistance = check_inception_available()
    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=True).to(device)
    except Exception as e:  # no torch-fidelity, or the weights cannot be downloaded (offline)
        raise ConfigError(f"Inception FID could not load its Inception-v3 weights ({type(e).__name__}: {e}); use 'fd' offline") from e
    for images, real in ((real_images, True), (synthetic_images, False)):
        for start in range(0, len(images), 256):
            x = (images[start : start + 256].float().clamp(-1, 1) + 1) / 2
            metric.update(x.expand(-1, 3, -1, -1).to(device), real=real)
    return {
        "value": float(metric.compute()),
        "metric": "FID (Inception-v3, torchmetrics)",
        "num_real": len(real_images),
        "num_synthetic": len(synthetic_images),
    }
