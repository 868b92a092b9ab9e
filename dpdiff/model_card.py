"""The model card: the privacy guarantee of a run, in words and numbers, next to its weights.

Built with huggingface_hub's ModelCard/ModelCardData, from privacy.json alone (never from memory
of the training process), so what is published is what the accountant wrote. Numbers shown in
prose are rounded UP: a card must never state a smaller epsilon or delta than the run's. The card
embeds synthetic images only."""

from __future__ import annotations

import json
import math
import os
import re
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub import ModelCard, ModelCardData

from dpdiff.errors import PrivacyError
from dpdiff.families import family_named
from dpdiff.io import write_text
from dpdiff.run_files import CARD_FILE, PLOT_IMAGES, SAMPLE_IMAGES  # noqa: F401  (re-exported)
from dpdiff.sampling.records import HUB_ID, RunRecord, read_run

# an embedded image whose name says it may show (or reconstruct) private data is refused
REAL_DATA_NAME = re.compile(r"real|train|private|data|orig|input|recon|target|cache|latent", re.IGNORECASE)
UNIT_OF_PRIVACY = "one training image together with its label/caption"

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Privacy guarantee

{{ delta_warning }}
{{ guarantee_words }}

| quantity | value |
|---|---|
{{ guarantee_table }}

### What is protected, and what is not

- **Protected:** {{ unit }}. Anything computed from these weights (images sampled from them, datasets
  built from those images) is post-processing and keeps the same guarantee.
- **Not covered: hyperparameter tuning on the private data.** The guarantee assumes the
  hyperparameters above were chosen without looking at the private data (or on public data). Runs
  tried and compared on the private data spend privacy that this card does not count.
- **Not covered: the base model's own training data.** This adapter adds a guarantee only for
  the fine-tuning data; whatever the base model `{{ base_model }}` memorised from its pretraining
  data is untouched.
- **Public by design:** the class names and prompts ({{ class_names }}), the dataset's name, the
  number of training examples and every hyperparameter in the table are treated as public.
- **People, not images:** the unit is one image. A person who appears in k images is protected
  with a weaker guarantee (group privacy: about k·ε, with a larger δ).

## How to use

```python
{{ usage }}
```

A synthetic dataset with dpdiff (seeded: the same seed gives the same images):

```bash
dpdiff sample --model_dir {{ repo }} --output_dir synthetic --num_per_class 100 --seed 0
```

{{ images }}
"""


def round_up(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits, rounded towards +inf: never below the true value."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    exact = Decimal(repr(float(value)))
    up = exact.quantize(Decimal(1).scaleb(exact.adjusted() - digits + 1), rounding=ROUND_CEILING)
    return format(up.normalize(), "f") if abs(value) >= 1e-6 else f"{float(up):.{digits - 1}g}"


def check_embeddable(run_dir: Path, name: str) -> None:
    if REAL_DATA_NAME.search(name):
        raise PrivacyError(
            f"refusing to embed {name!r} in the model card: its name suggests real or reconstructed training data; "
            "only synthetic samples (samples.png) and plots may be published"
        )
    if not (run_dir / name).is_file():
        raise PrivacyError(f"{run_dir / name} does not exist; cannot embed it in the model card")


def build_model_card(
    run_dir: str | os.PathLike,
    repo_id: str | None = None,
    license: str = "other",
    images: Sequence[str] | None = None,
) -> ModelCard:
    """A ModelCard for a run folder; `repo_id` (where it will live) goes into the usage snippet.

    `images` defaults to the synthetic grid and the epsilon plot when they exist."""
    run = read_run(run_dir, strict_privacy=True)
    p, gen = run.privacy, run.generation
    base = str(gen.get("base_model") or p.get("base_model", "unknown"))
    repo = repo_id or str(run.path)
    if images is None:
        images = [n for n in (*SAMPLE_IMAGES, *PLOT_IMAGES) if (run.path / n).is_file()]
    for name in images:
        check_embeddable(run.path, name)

    metadata = dict(
        library_name="diffusers" if run.method != "mepf" else "pytorch",
        license=license,
        tags=card_tags(run.method),
        pipeline_tag="text-to-image" if run.method != "mepf" else "unconditional-image-generation",
    )
    widget = [{"text": t, "output": {"url": SAMPLE_IMAGES[0]}} for t in public_prompts(run) if t]
    if widget and SAMPLE_IMAGES[0] in images:  # the hub's widget examples: the prompts the grid was drawn from
        metadata["widget"] = widget
    if HUB_ID.match(base) and not Path(base).exists():
        metadata.update(base_model=base, base_model_relation="adapter" if run.method == "lora" else "finetune")
    title = f"{'DP-LoRA adapter' if run.method == 'lora' else 'DP fine-tuned ' + run.method} · {base}" if run.method != "mepf" else "DP-MEPF generator"
    card = ModelCard.from_template(
        ModelCardData(**metadata),
        template_str=TEMPLATE,
        title=title,
        summary=summary_line(run, base),
        guarantee_words=guarantee_words(p),
        guarantee_table="\n".join(f"| {k} | {v} |" for k, v in guarantee_rows(run)),
        delta_warning=delta_warning(p),
        unit=unit_of_privacy(p)[0].upper() + unit_of_privacy(p)[1:],
        base_model=base,
        class_names=", ".join(f"`{c}`" for c in run.class_names) or "none",
        usage=usage_snippet(run, base, repo),
        repo=repo,
        images="\n\n".join(image_markdown(n) for n in images),
    )
    return card


def write_model_card(run_dir: str | os.PathLike, repo_id: str | None = None, license: str = "other", images: Sequence[str] | None = None) -> Path:
    """Write README.md into the run folder (atomically) and return its path."""
    card = build_model_card(run_dir, repo_id=repo_id, license=license, images=images)
    path = Path(run_dir) / CARD_FILE
    write_text(path, str(card))
    return path


def card_tags(method: str) -> list[str]:
    tags = ["differential-privacy", "dpdiff"]
    if method == "mepf":
        return tags + ["dp-mepf", "image-generation"]
    tags += ["dp-sgd", "diffusers", "text-to-image"]
    return tags + (["lora"] if method == "lora" else [])


def summary_line(run: RunRecord, base: str) -> str:
    p = run.privacy
    model = "UNet" if family_named(run.generation.get("family", "sd")).denoiser_attr == "unet" else "transformer"
    how = {
        "lora": f"LoRA adapters on the {model}'s attention projections",
        "attention": f"the {model}'s attention blocks",
        "full": f"every {model} parameter",
        "mepf": "a generator matched to a DP mean embedding of perceptual features",
    }[run.method]
    if run.method == "lora" and p.get("lora_target_modules"):
        how = f"LoRA adapters (rank {p.get('lora_rank')}) on the {model} layers {', '.join(f'`{t}`' for t in p['lora_target_modules'])}"
    data = p.get("dataset", "a private dataset")
    n = p.get("num_examples")
    size = f" ({n} examples)" if n is not None else ""
    return (
        f"{how[0].upper() + how[1:]} trained with differential privacy on `{data}`{size}, starting from `{base}`. "
        f"Guarantee: **(ε, δ) = ({round_up(p['epsilon'])}, {round_up(p['delta'])})** per training example."
    )


def guarantee_words(p: dict[str, Any]) -> str:
    eps, delta = round_up(p["epsilon"]), round_up(p["delta"])
    relation = p.get("neighbouring_relation", "add/remove one example")
    k = p.get("noise_multiplicity", 1)
    per_example = f" (averaged over its {k} noise/timestep draws first)" if isinstance(k, int) and k > 1 else ""
    if p["method"] == "mepf":
        mech = (
            "The mean embedding of the training examples' perceptual features (each example's vector "
            "normalised to a fixed norm, which bounds its influence) was released once with the Gaussian "
            "mechanism; the generator was then trained on that release only."
        )
    else:
        mech = (
            f"Training used DP-SGD: each logical step samples every example independently with probability q "
            f"(Poisson sampling), clips each example's gradient{per_example} to norm C, sums, and adds Gaussian "
            f"noise of standard deviation σ·C once."
        )
    return (
        f"These weights are ({eps}, {delta})-differentially private with respect to {unit_of_privacy(p)}: for any "
        f"such example, the probability of any outcome changes by at most a factor e^ε = "
        f"{round_up(math.exp(min(p['epsilon'], 700)))} (plus δ) whether or not the example was in the training set. "
        f"Neighbouring datasets: {relation}. {mech} ε was computed with the `{p.get('accountant', 'unknown')}` accountant."
    )


def unit_of_privacy(p: dict[str, Any]) -> str:
    return str(p.get("unit_of_privacy") or UNIT_OF_PRIVACY)


def guarantee_rows(run: RunRecord) -> list[tuple[str, Any]]:
    p = run.privacy
    labels = [
        ("epsilon", "ε"),
        ("delta", "δ"),
        ("accountant", "accountant"),
        ("neighbouring_relation", "neighbouring relation"),
        ("noise_multiplier", "noise multiplier σ"),
        ("max_grad_norm", "clipping norm C"),
        ("sample_rate", "sample rate q"),
        ("steps", "steps"),
        ("noise_multiplicity", "noise multiplicity K (averaged inside each example before clipping)"),
        ("batch_size", "expected batch size"),
        ("num_examples", "training examples n"),
        ("trainable_parameters", "trainable parameters"),
        ("method", "method"),
        ("dataset", "private dataset"),
        ("unit_of_privacy", "unit of privacy"),
    ]
    rows = [(label, f"`{p[key]}`") for key, label in labels if key in p]
    if "unit_of_privacy" not in p:
        rows.append(("unit of privacy", UNIT_OF_PRIVACY))
    known = {k for k, _ in labels}
    rows += [(k, f"`{v}`") for k, v in sorted(p.items()) if k not in known and isinstance(v, (int, float, str, bool))]
    return rows


def predictable_noise(p: dict[str, Any]) -> str | None:
    """Why the noise was predictable (a fixed seed, for tests), or None when it came from real entropy."""
    source = str(p.get("noise_source", ""))
    if "not private" in source.lower() or "fixed" in source.lower():
        return source
    if p.get("privacy_seed") is not None:
        return f"privacy_seed = {p['privacy_seed']}"
    return None


def delta_warning(p: dict[str, Any]) -> str:
    warnings = []
    fixed = predictable_noise(p)
    if fixed:
        warnings.append(
            f"> **Warning: NOT private.** The noise of this run was drawn from a fixed seed ({fixed}); anyone "
            "who knows the seed can remove it. The numbers below describe the mechanism, not these weights.\n"
        )
    n = p.get("num_examples")
    if isinstance(n, (int, float)) and n > 0 and p["delta"] >= 1.0 / n:
        warnings.append(
            f"> **Warning:** δ = {p['delta']} is not below 1/n = {1.0 / n:.3g}. With such a δ a mechanism that "
            "publishes one training example at random satisfies the guarantee; treat it as weak.\n"
        )
    return "\n".join(warnings)


def public_prompts(run: RunRecord) -> list[str]:
    """The run's public prompts: --validation_prompt (text the user typed), else the class prompts."""
    return list(run.generation.get("validation_prompts") or run.class_prompts)


def usage_snippet(run: RunRecord, base: str, repo: str) -> str:
    gen = run.generation
    if run.method == "mepf":
        return (
            "from huggingface_hub import snapshot_download\nfrom dpdiff.mepf import sample_mepf\n"
            f'images, labels, class_names = sample_mepf(snapshot_download("{repo}"), num_per_class=10, seed=0)'
        )
    family = family_named(gen.get("family", "sd"))
    prompt = json.dumps((public_prompts(run) or ["a photo"])[0], ensure_ascii=False)[1:-1]  # inside "...": quotes escaped
    call = family.usage_call(prompt, gen.get("num_inference_steps", 50), gen.get("guidance_scale", 1.0))
    if base == "dpdiff-tiny":
        load_base = 'from dpdiff.pipelines.loading import load_pipeline\npipe = load_pipeline("dpdiff-tiny")  # the base ships with dpdiff'
    elif gen.get("vae"):  # trained with --pretrained_vae_model_name_or_path: sample with the same VAE
        load_base = (f'from diffusers import AutoencoderKL, DiffusionPipeline\nvae = AutoencoderKL.from_pretrained("{gen["vae"]}")\n'
                     f'pipe = DiffusionPipeline.from_pretrained("{base}", vae=vae)')
    else:
        load_base = f'from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("{base}")'
    if run.method == "lora":
        return f'{load_base}\n{family.usage_load_lora(repo)}\n{call}'
    denoiser_class, attr = family.denoiser_classes[0], family.denoiser_attr
    return (
        f'{load_base}\nfrom diffusers import {denoiser_class}\n'
        f'pipe.{attr} = {denoiser_class}.from_pretrained("{repo}", subfolder="{attr}")\n{call}'
    )


def image_markdown(name: str) -> str:
    if name in PLOT_IMAGES:
        return f"### Privacy spent over training\n\n![epsilon over training steps]({name})"
    return f"## Synthetic samples\n\nSamples drawn from these weights (synthetic images only; no training image is shown).\n\n![synthetic samples]({name})"
