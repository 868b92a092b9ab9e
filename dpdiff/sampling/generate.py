"""Sample a synthetic dataset from a run: one seeded request per image, written atomically.

Each image has its own generator seeded from (seed, class or prompt index, image index), so a
sample does not depend on the batch it was drawn in, and asking for more images per class keeps
the first ones. (Batched float kernels may still move a pixel by one grey level between batch
sizes; the same seed and batch size give identical bytes.)

Sampling is post-processing of the DP model: the synthetic set carries the run's guarantee, which
is copied into `sampling.json` next to the images."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dpdiff.errors import ConfigError
from dpdiff.io import atomic_dir, write_json
from dpdiff.sampling import check_scheduler
from dpdiff.sampling.records import RunRecord, read_run, resolve_run

FORMATS = ("imagefolder", "datasets")
SPLIT = "train"
SUMMARY_FILE = "sampling.json"
DEFAULT_INFERENCE_STEPS = 50
DEFAULT_GUIDANCE = 1.0


@dataclass(frozen=True)
class Request:
    prompt: str
    label: int
    seed: int


def image_seed(seed: int, group: int, index: int) -> int:
    """A well-mixed 63-bit seed per image, independent of batching and of the total count."""
    return int(np.random.SeedSequence([seed, group, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def plan_requests(
    class_prompts: Sequence[str],
    num_per_class: int | None,
    prompts: Sequence[str] | None,
    num_per_prompt: int,
    seed: int,
) -> tuple[list[Request], list[str] | None]:
    """The images to make, in output order, and the label names (None: use the run's class names).

    With `prompts`, the label is the prompt's position in `prompts`."""
    if (num_per_class is None) == (not prompts):
        raise ConfigError("give exactly one of --num_per_class (one batch per class of the run) or --prompt (repeatable)")
    if prompts:
        if num_per_prompt is None or num_per_prompt <= 0:
            raise ConfigError(f"--num_per_prompt must be a positive integer, got {num_per_prompt!r}")
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ConfigError("every --prompt must be a non-empty string")
        if len(set(prompts)) != len(prompts):
            raise ConfigError("a --prompt is repeated; give each prompt once and set --num_per_prompt")
        reqs = [Request(p, g, image_seed(seed, g, i)) for g, p in enumerate(prompts) for i in range(num_per_prompt)]
        return reqs, list(prompts)
    if num_per_class <= 0:
        raise ConfigError(f"--num_per_class must be a positive integer, got {num_per_class}")
    if not class_prompts:
        raise ConfigError("the run records no class prompts; sample it with --prompt instead of --num_per_class")
    reqs = [Request(p, c, image_seed(seed, c, i)) for c, p in enumerate(class_prompts) for i in range(num_per_class)]
    return reqs, None


def check_output(output: Path, overwrite: bool, run_path: Path | None) -> None:
    output = output.resolve()
    if run_path is not None:
        run_path = run_path.resolve()
        if output == run_path or output in run_path.parents:
            raise ConfigError(f"output folder {output} contains the run folder {run_path}; writing there would destroy the model")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {output} is not empty; choose another folder or pass --overwrite to replace it")


def sample_dataset(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    num_per_class: int | None = None,
    prompts: Sequence[str] | None = None,
    num_per_prompt: int = 1,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    batch_size: int = 16,
    format: str = "imagefolder",
    resolution: int | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    scheduler: str = "ddim",
) -> Path:
    """Write a synthetic dataset (image, label, prompt) sampled from a fine-tuned or MEPF run.

    imagefolder: `train/*.png` + `train/metadata.jsonl` (file_name, label, prompt), readable by
    `datasets.load_dataset("imagefolder", data_dir=output)`; datasets: `Dataset.save_to_disk`.
    guidance_scale/num_inference_steps default to the run's generation_config.json. Images come
    back in the data's channels (grey if the private data was) and, with `resolution`, resized.
    `scheduler`: a key of dpdiff.sampling.pipeline.SCHEDULERS (diffusion runs)."""
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if batch_size <= 0:
        raise ConfigError(f"--batch_size must be positive, got {batch_size}")
    if resolution is not None and resolution <= 0:
        raise ConfigError(f"--resolution must be positive, got {resolution}")
    if num_inference_steps is not None and num_inference_steps <= 0:
        raise ConfigError(f"--num_inference_steps must be positive, got {num_inference_steps}")
    check_scheduler(scheduler)
    if torch_dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ConfigError("float16 sampling needs a GPU; use --dtype float32 (or bfloat16) on the CPU")
    output = Path(output)
    local_dir = Path(str(run_dir)).expanduser()
    check_output(output, overwrite, local_dir if local_dir.exists() else None)
    run = read_run(resolve_run(run_dir))
    check_output(output, overwrite, run.path)
    gen = run.generation
    guidance = float(gen.get("guidance_scale", DEFAULT_GUIDANCE) if guidance_scale is None else guidance_scale)
    steps = int(gen.get("num_inference_steps", DEFAULT_INFERENCE_STEPS) if num_inference_steps is None else num_inference_steps)

    if run.method == "mepf":
        if prompts:
            raise ConfigError("a DP-MEPF generator is class-conditional: use --num_per_class, not --prompt")
        if scheduler != "ddim":
            raise ConfigError(f"a DP-MEPF generator draws in one pass, it has no sampler: drop --scheduler {scheduler}")
        if num_per_class is None or num_per_class <= 0:
            raise ConfigError(f"--num_per_class must be a positive integer, got {num_per_class!r}")
        images, labels, names, texts = mepf_images(run, num_per_class, seed)
        channels = int(gen.get("channels", 3 if images and images[0].mode == "RGB" else 1))
        pngs = (encode_png(convert(im, channels, resolution)) for im in images)
        settings = {}
    else:
        requests, prompt_names = plan_requests(run.class_prompts, num_per_class, prompts, num_per_prompt, seed)
        names = prompt_names or run.class_names
        labels, texts = [r.label for r in requests], [r.prompt for r in requests]
        from dpdiff.sampling.pipeline import pipeline_for_run

        pipe = pipeline_for_run(run, base_model=base_model, device=device, torch_dtype=torch_dtype, scheduler=scheduler)
        channels = int(gen["channels"])
        pngs = (
            encode_png(convert(im, channels, resolution))
            for im in generate(pipe, requests, guidance, steps, batch_size, gen.get("resolution"))
        )
        settings = {"guidance_scale": guidance, "num_inference_steps": steps, "scheduler": type(pipe.scheduler).__name__, "dtype": str(torch_dtype).removeprefix("torch."), "base_model": base_model or gen["base_model"]}

    summary = {
        "model": str(run_dir),
        "method": run.method,
        "seed": seed,
        **settings,
        "format": format,
        "num_images": len(labels),
        "counts": {names[c] if 0 <= c < len(names) else str(c): labels.count(c) for c in sorted(set(labels))},
        "class_names": names,
        "channels": channels,
        "resolution": resolution or gen.get("resolution"),
        "privacy": {k: run.privacy[k] for k in ("epsilon", "delta", "accountant", "neighbouring_relation", "method") if k in run.privacy},
        "privacy_note": "post-processing of the DP-trained model: this synthetic set has the same (epsilon, delta) guarantee",
    }
    with atomic_dir(output) as tmp:
        if format == "imagefolder":
            write_imagefolder(tmp, pngs, labels, texts)
        else:
            write_datasets(tmp, pngs, labels, texts, names)
        write_json(tmp / SUMMARY_FILE, summary)
    return output


def generate(pipe, requests: list[Request], guidance_scale: float, num_inference_steps: int, batch_size: int,
             resolution: int | None = None):
    """Yield PIL images in request order, one tqdm bar over all of them (the family's stock pipeline call:
    prompts, or class labels for a class-conditional family) at `resolution` (the trained size; None: the
    pipeline's default)."""
    from dpdiff.families import family_for_pipeline

    family = family_for_pipeline(pipe)
    with tqdm(total=len(requests), desc="sampling", unit="img") as bar:
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]
            with torch.inference_mode():
                images = family.generate(pipe, [r.prompt for r in batch], [r.label for r in batch], generator=generators,
                                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                         resolution=resolution)
            yield from images
            bar.update(len(batch))


def mepf_images(run: RunRecord, num_per_class: int, seed: int):
    """Images from a DP-MEPF generator (dpdiff.mepf, imported only when needed)."""
    try:
        from dpdiff.mepf import sample_mepf
    except ImportError as e:
        raise ConfigError(f"{run.path} is a DP-MEPF run but dpdiff.mepf.sample_mepf is not available in this install ({e})") from e
    images, labels, names = sample_mepf(str(run.path), num_per_class, seed)
    prompts = run.class_prompts if len(run.class_prompts) == len(names) else list(names)
    labels = [int(l) for l in labels]
    return list(images), labels, list(names), [prompts[l] for l in labels]


def convert(image: Image.Image, channels: int, resolution: int | None) -> Image.Image:
    """Back to the private data's format: grey if it had one channel, optionally resized."""
    image = image.convert("L" if channels == 1 else "RGB")
    if resolution is not None and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return image


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # no metadata, no timestamp: same pixels -> same bytes
    return buf.getvalue()


def write_imagefolder(root: Path, pngs, labels: list[int], prompts: list[str]) -> None:
    split = root / SPLIT
    split.mkdir(parents=True)
    width = max(6, len(str(len(labels))))
    lines = []
    for i, png in enumerate(pngs):
        name = f"{i:0{width}d}.png"
        (split / name).write_bytes(png)
        lines.append(json.dumps({"file_name": name, "label": labels[i], "prompt": prompts[i]}))
    (split / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_datasets(root: Path, pngs, labels: list[int], prompts: list[str], names: list[str]) -> None:
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names)), "prompt": datasets.Value("string")}
    )
    images = [{"bytes": png, "path": None} for png in pngs]
    ds = datasets.Dataset.from_dict({"image": images, "label": labels, "prompt": prompts}, features=features)
    ds.save_to_disk(str(root))
