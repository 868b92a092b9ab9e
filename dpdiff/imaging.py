"""Image grids: what a person looks at after a run (samples, reconstructions)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from dpdiff.io import atomic_path


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N,C,H,W] in [-1,1] -> PIL images (grey when C == 1)."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    out = []
    for a in arr:
        a = a.transpose(1, 2, 0)
        out.append(Image.fromarray(a[..., 0] if a.shape[2] == 1 else a))
    return out


def make_grid(images: list[Image.Image], nrow: int | None = None, padding: int = 2, scale: int = 1) -> Image.Image:
    """Tile equally sized PIL images row by row (nrow images per row)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    ncol_rows = math.ceil(len(images) / nrow)
    w, h = images[0].size
    grid = Image.new("RGB", (nrow * (w + padding) + padding, ncol_rows * (h + padding) + padding), (40, 40, 40))
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid.paste(img.convert("RGB"), (padding + c * (w + padding), padding + r * (h + padding)))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def save_grid(images: list[Image.Image], path: str | os.PathLike, nrow: int | None = None, scale: int = 2) -> None:
    grid = make_grid(images, nrow=nrow, scale=scale)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def pil_to_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(img) for img in images])
