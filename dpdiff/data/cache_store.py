"""The latent cache on disk: safetensors shards written as the encoders go, read back through a memory
map one row at a time, so neither building nor training holds the whole cache in memory.

Why safetensors and not a `datasets` Arrow map: the rows are plain tensors read by index (no columns to
query), safetensors keeps bf16/fp16 (Arrow has no bfloat16) and maps the file without a copy, and it is
the format the diffusers/peft ecosystem already stores tensors in.

A cache is one folder: shards + `manifest.json`, written last. It is built in a temporary sibling
folder and renamed into place only when complete, so a run killed while encoding leaves nothing that a
later run could mistake for a cache."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_BYTES = 32 * 2**20  # rows are flushed to a shard file every ~32 MB: what a writer holds (x3 while it writes)


class ShardWriter:
    """Appends rows of named tensors; each shard file `<prefix>-NNNNN.safetensors` holds consecutive rows.

    Names in `ragged` are [L, ...] rows of varying length L: stored concatenated, with `<name>.offsets`."""

    def __init__(self, folder: Path, prefix: str, ragged: tuple[str, ...] = ()):
        self.folder, self.prefix, self.ragged = Path(folder), prefix, set(ragged)
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_bytes, self.counts = 0, []

    def add(self, rows: dict[str, torch.Tensor | list[torch.Tensor]]) -> None:
        """`rows[name]`: a [k, ...] tensor, or (ragged names) a list of k tensors."""
        for name, value in rows.items():
            items = list(value) if name in self.ragged else [value]
            self.pending.setdefault(name, []).extend(t.contiguous() for t in items)
            self.pending_bytes += sum(t.numel() * t.element_size() for t in items)
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tensors, count = {}, None
        for name, parts in self.pending.items():
            if name in self.ragged:
                lengths = torch.tensor([0] + [len(p) for p in parts])
                tensors[name] = torch.cat(parts) if sum(len(p) for p in parts) else parts[0][:0]
                tensors[f"{name}.offsets"] = lengths.cumsum(0)
                rows = len(parts)
            else:
                tensors[name] = torch.cat(parts)
                rows = len(tensors[name])
            if count is not None and rows != count:
                raise ValueError(f"shard rows disagree: {name} has {rows}, others {count}")
            count = rows
        save_file(tensors, str(self.folder / f"{self.prefix}-{len(self.counts):05d}.safetensors"))
        self.counts.append(count)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[int]:
        self.flush()
        return self.counts


class ShardedRows:
    """Rows of one stored tensor, read lazily from its shards (memory-mapped); floats come back in fp32.

    `pad_to` (ragged rows): each row [L, ...] is zero-padded to [pad_to, ...]; `as_mask` returns instead
    the row's attention mask (L ones, then zeros). The length a row is padded to is the same for every row:
    what a row looks like never depends on the rows it is batched with."""

    def __init__(self, folder: Path, prefix: str, counts: list[int], name: str, pad_to: int | None = None,
                 as_mask: bool = False):
        self.folder, self.prefix, self.name, self.pad_to, self.as_mask = Path(folder), prefix, name, pad_to, as_mask
        self.starts = [0]
        for c in counts:
            self.starts.append(self.starts[-1] + c)
        self._files: dict[int, object] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def _file(self, shard: int):
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.folder / f"{self.prefix}-{shard:05d}.safetensors"), framework="pt")
        return self._files[shard]

    def _locate(self, index: int) -> tuple[int, int]:
        import bisect

        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        index %= len(self)
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def row(self, index: int) -> torch.Tensor:
        shard, j = self._locate(index)
        f = self._file(shard)
        if self.pad_to is None:
            return _fp32(f.get_slice(self.name)[j])
        offsets = f.get_slice(f"{self.name}.offsets")[j : j + 2].tolist()
        length = offsets[1] - offsets[0]
        if self.as_mask:
            mask = torch.zeros(self.pad_to)
            mask[:length] = 1
            return mask
        values = _fp32(f.get_slice(self.name)[offsets[0] : offsets[1]])
        out = torch.zeros((self.pad_to, *values.shape[1:]), dtype=values.dtype)
        out[:length] = values
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            return torch.stack([self.row(i) for i in range(*index.indices(len(self)))])
        if isinstance(index, (list, tuple)) or (isinstance(index, torch.Tensor) and index.dim() == 1):
            return torch.stack([self.row(int(i)) for i in index])
        return self.row(int(index))

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row(0).shape)

    def __getstate__(self):  # open memory maps do not pickle; a copy reopens its shards
        return {**self.__dict__, "_files": {}}


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def building_folder(target: Path) -> Path:
    """A fresh temporary sibling of `target` to build into (stale ones of killed runs are removed first)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))


def publish(building: Path, target: Path, manifest: dict) -> None:
    """Write the manifest last, then move the finished cache into place in one rename."""
    (Path(building) / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, **manifest}, indent=1))
    target = Path(target)
    if target.exists():  # an empty folder, or a replaced cache: removed only now that the new one is complete
        shutil.rmtree(target)
    os.replace(building, target)
