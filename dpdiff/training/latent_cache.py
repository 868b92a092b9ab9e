"""Encode the private set once with the frozen VAE and text encoder(s); reuse the latents every epoch.

Each cached entry is a function of ONE example through public, frozen, data-independent
encoders, so building the cache costs no privacy: the DP-SGD step sees the same per-example inputs
it would see if it encoded every step, only cheaper. The cache lives on disk (`dpdiff.data.cache_store`),
fingerprinted by what it depends on (`dpdiff.data.cache_fingerprint`), and is read a row at a time."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dpdiff.data.cache_fingerprint import cache_fingerprint, check_matches
from dpdiff.data.cache_store import ShardedRows, ShardWriter, building_folder, publish, read_manifest
from dpdiff.data.encode import (  # noqa: F401 (encode_images: the in-memory helper, re-exported)
    arrays_to_tensor,
    default_encode_batch_size,
    encode_fixed_batch,
    encode_images,
    encode_pixels,
    image_batches,
    storage_dtype,
)
from dpdiff.data.image_source import ImageSource
from dpdiff.errors import DataError
from dpdiff.families.stable_diffusion import encode_clip_prompts as encode_prompts  # noqa: F401 (SD's prompt encoder)
from dpdiff.privacy.diffusion_loss import example_generator

logger = logging.getLogger(__name__)
MASK = "encoder_attention_mask"
PROMPTS_PER_CHUNK = 64  # prompts encoded (and held) at a time


@dataclass
class LatentCache(Dataset):
    """Per-example latents + an index into the distinct conditionings (prompts, or class labels).

    `latents`, `flipped_latents` and the conditioning rows are tensors, or `ShardedRows` read from disk
    one row at a time (a cache built with a `cache_dir`): indexing gives the same rows either way.

    `prompt_embeddings`: the family's conditioning tensors by name, [P + 1, ...] each, the last row the
    unconditional one (empty prompt / null class); a bare tensor is the `encoder_hidden_states` of the
    SD family.

    `cond_dropout`: with this probability an example's prompt is replaced by the empty prompt, so
    classifier-free guidance keeps working. The coin is keyed by (seed, step, index) like the
    engine's noise draws: independent of the data, reproducible, and unchanged by a resume.

    `flipped_latents` (`--random_flip`): the latents of the mirrored images, [N, C, h, w]; each
    (step, example) then takes it with probability 1/2, by a public coin keyed (seed + 2, step, index)
    like the dropout coin. None (the default): no flipping."""

    latents: torch.Tensor | ShardedRows
    prompt_ids: torch.Tensor
    prompt_embeddings: torch.Tensor | dict  # [P + 1, ...] per name; the last row is the unconditional one
    labels: torch.Tensor
    cond_dropout: float = 0.0
    seed: int = 0
    step: int = 0  # the training loop keeps this equal to the engine's step count
    flipped_latents: torch.Tensor | ShardedRows | None = None  # --random_flip: the mirrored images' latents
    folder: Path | None = field(default=None, repr=False)  # where an on-disk cache lives
    manifest: dict = field(default_factory=dict, repr=False)  # what building it recorded (timings, sizes)

    @classmethod
    def per_example(cls, latents: torch.Tensor, conditions: dict) -> "LatentCache":
        """A cache whose every example has its own conditioning row (no prompt groups, no guidance
        dropout): for tests and benchmarks that bring their own latents and encoded conditions."""
        n = len(latents)
        return cls(latents=latents, prompt_ids=torch.arange(n), prompt_embeddings=dict(conditions),
                   labels=torch.zeros(n, dtype=torch.long))

    def __post_init__(self):
        if self.flipped_latents is not None and tuple(self.flipped_latents.shape) != tuple(self.latents.shape):
            raise ValueError(f"flipped_latents {tuple(self.flipped_latents.shape)} must match latents {tuple(self.latents.shape)}")
        if isinstance(self.prompt_embeddings, torch.Tensor):
            self.prompt_embeddings = {"encoder_hidden_states": self.prompt_embeddings}
        rows = {name: len(value) for name, value in self.prompt_embeddings.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"every conditioning tensor needs one row per prompt, got {rows}")

    @property
    def conditions(self) -> dict:
        return self.prompt_embeddings

    @property
    def num_conditions(self) -> int:
        return len(next(iter(self.prompt_embeddings.values())))

    def __len__(self) -> int:
        return len(self.latents)

    def flipped(self, index: int, step: int | None = None) -> bool:
        """Whether example `index` is drawn mirrored at `step` (default: the current step): a fair public coin."""
        if self.flipped_latents is None:
            return False
        step = self.step if step is None else step
        return bool(torch.rand((), generator=example_generator(self.seed + 2, step, index)) < 0.5)

    def __getitem__(self, index: int) -> dict:
        prompt = int(self.prompt_ids[index])
        latents = self.flipped_latents[index] if self.flipped(index) else self.latents[index]
        if self.cond_dropout > 0:
            coin = torch.rand((), generator=example_generator(self.seed + 1, self.step, index))
            if coin < self.cond_dropout:
                prompt = self.num_conditions - 1
        return {"latents": latents, **{name: value[prompt] for name, value in self.prompt_embeddings.items()}}


def build_latent_cache(pipeline, source: ImageSource, resolution: int, cond_dropout: float = 0.0, seed: int = 0,
                       batch_size: int | None = None, show_progress: bool = True, family=None,
                       random_flip: bool = False, cache_dir: str | Path | None = None,
                       replace_mismatch: bool = False) -> LatentCache:
    """Run the frozen encoders once over `source` (images, and prompts or labels as the family conditions).

    Examples are grouped by their prompt (label families: their class label); the family encodes each
    distinct group once, plus the unconditional one (empty prompt / null class) for guidance.
    `random_flip`: also encode every image mirrored (twice the latents), see `LatentCache`.
    `batch_size`: images per VAE batch (default: by pixels, `default_encode_batch_size`).

    `cache_dir`: keep the cache there, on disk, read a row at a time (memory flat in the number of
    images); a cache already there is reused when its fingerprint matches (nothing is re-encoded) and
    refused when not, unless `replace_mismatch`. None: build in a temporary folder and load it into
    memory (small sets, tests). `resolution` must be a multiple of the VAE factor times the patch size."""
    from dpdiff.data.transforms import check_resolution
    from dpdiff.families import family_for_pipeline
    from dpdiff.families.base import NULL_LABEL, UNCONDITIONAL_PROMPT

    family = family or family_for_pipeline(pipeline)
    check_resolution(resolution, family.resolution_multiple(pipeline))
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0):
        raise DataError(f"--encode_batch_size must be a positive integer, got {batch_size!r}")
    by_label = family.conditioning == "label"
    keys = [int(x) for x in source.dataset["label"]] if by_label else list(source.dataset["prompt"])
    distinct = list(dict.fromkeys(keys))
    index = {k: i for i, k in enumerate(distinct)}
    condition_keys = distinct + [NULL_LABEL if by_label else UNCONDITIONAL_PROMPT]
    fingerprint = cache_fingerprint(source, pipeline, family, resolution, random_flip, condition_keys)
    temporary = cache_dir is None
    folder = Path(tempfile.mkdtemp(prefix="dpdiff-latents-")) / "cache" if temporary else Path(cache_dir).expanduser()
    try:
        manifest = read_manifest(folder)
        if manifest is not None:
            try:
                check_matches(manifest.get("fingerprint", {}), fingerprint, folder)
                logger.info("reusing the latent cache in %s (%d examples): nothing is re-encoded", folder, len(keys))
            except DataError:
                if not replace_mismatch:
                    raise
                logger.warning("replacing the latent cache in %s: it was built for other data or settings", folder)
                manifest = None
        elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise DataError(f"--cache_dir {folder} exists and is not a dpdiff latent cache (no manifest.json); "
                            "point --cache_dir at an empty or new folder")
        if manifest is None:
            prompt_ids = torch.tensor([index[k] for k in keys])
            _encode(pipeline, family, source, folder, resolution, condition_keys, by_label, random_flip,
                    batch_size or default_encode_batch_size(resolution), fingerprint, prompt_ids, show_progress)
            manifest = read_manifest(folder)
        cache = open_cache(folder, manifest, cond_dropout, seed, in_memory=temporary)
    finally:
        if temporary:
            shutil.rmtree(folder.parent, ignore_errors=True)
    return cache


def _encode(pipeline, family, source, folder: Path, resolution: int, condition_keys: list, by_label: bool,
            random_flip: bool, batch_size: int, fingerprint: dict, prompt_ids: torch.Tensor, show_progress: bool) -> None:
    """Encode into a temporary sibling folder, then publish it whole (a killed run leaves no cache)."""
    building = building_folder(folder)
    try:
        started = time.perf_counter()
        conditions = _encode_conditions(pipeline, family, building, resolution, condition_keys, by_label)
        text_seconds = time.perf_counter() - started
        vae = pipeline.vae
        dtype = storage_dtype(vae)
        writer = ShardWriter(building, "latents")
        started = time.perf_counter()
        bar = tqdm(total=len(prompt_ids), desc="encoding latents", disable=not show_progress, unit="img")
        for arrays in image_batches(source.dataset, batch_size, resolution, vae.config.in_channels):
            rows = {"latents": encode_fixed_batch(vae, arrays_to_tensor(arrays), batch_size).to(dtype)}
            if random_flip:
                rows["flipped_latents"] = encode_fixed_batch(vae, arrays_to_tensor(arrays, mirrored=True), batch_size).to(dtype)
            writer.add(rows)
            bar.update(len(arrays))
        bar.close()
        image_seconds = time.perf_counter() - started
        save_file({"prompt_ids": prompt_ids, "labels": torch.tensor([int(l) for l in source.dataset["label"]])},
                  str(building / "index.safetensors"))
        publish(building, folder, {
            "fingerprint": fingerprint, "latent_counts": writer.close(), "random_flip": random_flip,
            "conditions": conditions, "encode_batch_size": batch_size, "encode_seconds": image_seconds,
            "text_encode_seconds": text_seconds, "images_per_second": len(prompt_ids) / max(image_seconds, 1e-9),
        })
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _trimmed(chunk: dict) -> tuple[dict, tuple[str, ...], int | None]:
    """Masked families (T5/Gemma with an attention mask the denoiser uses): each prompt's hidden states kept
    at its own token count (the masked padding is dropped and restored as zeros when read, which the
    denoiser's mask ignores). Returns rows, the ragged names and the padded length."""
    mask = chunk.get(MASK)
    if mask is None:
        return chunk, (), None
    lengths = mask.sum(dim=1).long()
    positions = torch.arange(mask.shape[1])
    if not torch.equal(mask.bool(), positions[None, :] < lengths[:, None]):
        return chunk, (), None  # not right-padded: keep every position
    length = int(mask.shape[1])
    ragged = tuple(n for n, v in chunk.items() if n != MASK and v.dim() >= 3 and v.shape[1] == length)
    rows = {n: ([v[i, : lengths[i]] for i in range(len(v))] if n in ragged else v) for n, v in chunk.items() if n != MASK}
    return rows, ragged, length


def _encode_conditions(pipeline, family, building: Path, resolution: int, keys: list, by_label: bool) -> dict:
    """The distinct conditionings, a chunk of prompts at a time, into `conditions-*` shards."""
    text_dtype = next((storage_dtype(getattr(pipeline, n)) for n in family.text_encoder_names(pipeline)), torch.float32)
    chunks = [keys] if by_label else [keys[i : i + PROMPTS_PER_CHUNK] for i in range(0, len(keys), PROMPTS_PER_CHUNK)]
    writer, layout = None, None
    for chunk in chunks:
        # every chunk of captions padded to the same count with the public empty prompt (see
        # `encode_fixed_batch`): a caption's embedding must not depend on how many others share its chunk
        padded = chunk if by_label else chunk + [""] * (PROMPTS_PER_CHUNK - len(chunk))
        encoded = {name: value[: len(chunk)] for name, value in family.encode_conditions(pipeline, padded, resolution).items()}
        rows, ragged, length = _trimmed(encoded)
        if layout is None:
            layout = {"names": list(encoded), "ragged": list(ragged), "length": length}
            writer = ShardWriter(building, "conditions", ragged=ragged)
        elif list(ragged) != layout["ragged"]:
            raise DataError(f"the text encoder padded some prompts on the left ({MASK} is not a prefix of ones); the "
                            "latent cache stores masked prompts right-padded")
        writer.add({n: (v.to(text_dtype) if n not in ragged and v.is_floating_point() else
                        [r.to(text_dtype) for r in v] if n in ragged else v) for n, v in rows.items()})
    layout["counts"] = writer.close()
    return layout


def open_cache(folder: Path, manifest: dict, cond_dropout: float = 0.0, seed: int = 0, in_memory: bool = False) -> LatentCache:
    """The cache published in `folder`: rows read from its shards on demand, or (`in_memory`) all loaded now."""
    folder = Path(folder)
    layout = manifest["conditions"]
    expected = [f"latents-{i:05d}.safetensors" for i in range(len(manifest["latent_counts"]))]
    expected += [f"conditions-{i:05d}.safetensors" for i in range(len(layout["counts"]))] + ["index.safetensors"]
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise DataError(f"the latent cache in {folder} lacks {len(missing)} file(s), e.g. {missing[0]}: delete that folder "
                        "to encode again")
    ragged, length = set(layout["ragged"]), layout["length"]
    conditions = {}
    for name in layout["names"]:
        if name in ragged:
            conditions[name] = ShardedRows(folder, "conditions", layout["counts"], name, pad_to=length)
        elif name == MASK and ragged:
            conditions[name] = ShardedRows(folder, "conditions", layout["counts"], sorted(ragged)[0], pad_to=length, as_mask=True)
        else:
            conditions[name] = ShardedRows(folder, "conditions", layout["counts"], name)
    latents = ShardedRows(folder, "latents", manifest["latent_counts"], "latents")
    flipped = ShardedRows(folder, "latents", manifest["latent_counts"], "flipped_latents") if manifest["random_flip"] else None
    if in_memory:
        latents = latents[:]
        flipped = flipped[:] if flipped is not None else None
        conditions = {n: v[:] for n, v in conditions.items()}
    index = load_file(str(folder / "index.safetensors"))
    return LatentCache(latents=latents, prompt_ids=index["prompt_ids"], prompt_embeddings=conditions, labels=index["labels"],
                       cond_dropout=cond_dropout, seed=seed, flipped_latents=flipped,
                       folder=None if in_memory else folder, manifest=manifest)


def cache_size_bytes(folder: Path) -> int:
    """Bytes the cache takes on disk."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
