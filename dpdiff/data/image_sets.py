"""Image sets that decode on read, so a pass over N images holds what one batch needs, not the whole set.

100k images at 512 px are ~300 GB as float tensors. `ImageTensors` looks enough like an [N, C, R, R] tensor
for the paths that read images in batches (len, shape, slices, index subsets) — FD in `dpdiff evaluate`, the
DP-MEPF release and `dpdiff tune`'s score release — and decodes each slice with `images_to_tensor`'s own
preprocessing, so results are unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dpdiff.data.image_check import open_image
from dpdiff.data.transforms import images_to_tensor

DECODE_CHUNK = 256  # images decoded at once when a whole tensor is built


class ImageColumn(Sequence):
    """Row i's image of a `datasets` dataset (or any indexable of rows), decoded when read."""

    def __init__(self, rows, column: str = "image"):
        self.rows, self.column = rows, column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.rows[int(index)][self.column]


class ImageFiles(Sequence):
    """Image files opened and fully decoded when read (a file is checked once when the set is loaded)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return open_image(self.paths[int(index)])


class ImageTensors:
    """`images` (a sequence of PIL images, decoded when read) as [N, C, R, R] in [-1, 1], decoded a slice at a time."""

    ndim = 4

    def __init__(self, images: Sequence, resolution: int, channels: int, indices: Sequence[int] | None = None):
        self.images, self.resolution, self.channels = images, int(resolution), int(channels)
        self.indices = list(range(len(images))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.channels, self.resolution, self.resolution)

    def subset(self, indices) -> "ImageTensors":
        """The images at `indices` (positions in this set), still undecoded."""
        picked = torch.as_tensor(indices, dtype=torch.long).tolist()
        return ImageTensors(self.images, self.resolution, self.channels, [self.indices[i] for i in picked])

    def __getitem__(self, key):
        if isinstance(key, int):  # one image, [C, R, R], like a tensor's row (IndexError out of range)
            return images_to_tensor([self.images[self.indices[key]]], self.resolution, self.channels)[0]
        if isinstance(key, slice):
            rows = self.indices[key]
            if not rows:
                return torch.zeros(0, self.channels, self.resolution, self.resolution)
            return images_to_tensor([self.images[i] for i in rows], self.resolution, self.channels)
        return self.subset(key)

    def tensor(self) -> torch.Tensor:
        """Every image decoded into one tensor (the classifiers' input): chunk by chunk into one allocation."""
        out = torch.empty(self.shape)
        for start in range(0, len(self), DECODE_CHUNK):
            out[start:start + DECODE_CHUNK] = self[start:start + DECODE_CHUNK]
        return out
