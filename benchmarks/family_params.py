"""How many parameters each `--method` trains on the real denoisers of every supported model family.

Each denoiser is built from its published config (written out below) on the meta device: no weights,
no memory, no hub. The counts come from dpdiff's own `prepare_trainable` (LoRA rank 8 on the family's
default targets, `attention` from block 0, `full`), so they include what dpdiff leaves frozen because
Opacus has no per-example gradient rule for the module that owns it.

    python benchmarks/family_params.py                 # print the table
    python benchmarks/family_params.py --write_docs    # also replace the marked section of docs/recipes.md
    python benchmarks/family_params.py --models sd-1.5 dit-xl-2-256"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpdiff.adapters import prepare_trainable  # noqa: E402
from dpdiff.families import family_named  # noqa: E402
from dpdiff.io import write_text  # noqa: E402

RECIPES_MD = ROOT / "docs" / "recipes.md"
START, END = "<!-- family_params:start -->", "<!-- family_params:end -->"
RANK = 8


@dataclass(frozen=True)
class Model:
    label: str  # shown in the table
    family: str  # dpdiff.families name
    denoiser_class: str  # diffusers class
    config: dict  # the hub config.json values that decide the shapes (the rest are the class defaults)
    source: str


# Values of each checkpoint's denoiser config.json on the Hugging Face hub (keys that do not change any
# parameter shape, e.g. dropout, norm_eps, act_fn, are left at the class defaults). Where a diffusers class
# default equals the checkpoint's value it is still written here, so a change of defaults cannot move a row.
MODELS = {
    "sd-1.5": Model(
        "SD-1.5", "sd", "UNet2DConditionModel",
        # stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json (== diffusers' UNet2DConditionModel defaults)
        dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        "stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json"),
    "sdxl-base-1.0": Model(
        "SDXL-base-1.0", "sdxl", "UNet2DConditionModel",
        # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
             attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816),
        "stabilityai/stable-diffusion-xl-base-1.0 unet/config.json"),
    "sd3.5-medium": Model(
        "SD3.5-medium", "sd3", "SD3Transformer2DModel",
        # stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in blocks 0-12)
        dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        "stabilityai/stable-diffusion-3.5-medium transformer/config.json"),
    "flux.1-dev": Model(
        "Flux.1-dev", "flux", "FluxTransformer2DModel",
        # black-forest-labs/FLUX.1-dev transformer/config.json
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56)),
        "black-forest-labs/FLUX.1-dev transformer/config.json"),
    "pixart-sigma-1024": Model(
        "PixArt-Σ 1024", "pixart", "PixArtTransformer2DModel",
        # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json
        dict(sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
             attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
             norm_type="ada_norm_single", norm_elementwise_affine=False, num_embeds_ada_norm=1000,
             interpolation_scale=2, use_additional_conditions=False, activation_fn="gelu-approximate"),
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json"),
    "sana-1600m-1024": Model(
        "Sana-1600M-1024", "sana", "SanaTransformer2DModel",
        # Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/config.json (== the class defaults)
        dict(sample_size=32, patch_size=1, in_channels=32, out_channels=32, num_layers=20, num_attention_heads=70,
             attention_head_dim=32, num_cross_attention_heads=20, cross_attention_head_dim=112,
             cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, attention_bias=False),
        "Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/config.json"),
    "dit-xl-2-256": Model(
        "DiT-XL/2-256", "dit", "DiTTransformer2DModel",
        # facebook/DiT-XL-2-256 transformer/config.json (learned sigma: 8 output channels)
        dict(sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
             attention_head_dim=72, attention_bias=True, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
             activation_fn="gelu-approximate"),
        "facebook/DiT-XL-2-256 transformer/config.json"),
}
METHODS = ("lora", "attention", "full")


def build(model: Model) -> torch.nn.Module:
    """The denoiser with the real shapes, on the meta device (seconds, no memory)."""
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, model.denoiser_class)(**model.config)


def lora_targets(family) -> tuple[str, ...]:
    return tuple(family.default_lora_targets)


def matched_linears(denoiser, targets) -> list[tuple[str, torch.nn.Module]]:
    """The layers peft matches for `targets` (a module name equal to, or ending in '.' + a target)."""
    return [(n, m) for n, m in denoiser.named_modules()
            if n and any(n == t or n.endswith("." + t) for t in targets) and isinstance(m, torch.nn.Linear)]


def analytic_lora_params(denoiser, targets, rank: int) -> int:
    """r * (in + out) per matched Linear: the A (r x in) and B (out x r) matrices of each adapter."""
    return sum(rank * (m.in_features + m.out_features) for _, m in matched_linears(denoiser, targets))


def summarize_names(names: list[str]) -> str:
    """`transformer_blocks.*.scale_shift_table` x28 instead of 28 names."""
    groups: dict[str, int] = {}
    for name in names:
        key = re.sub(r"\.\d+(?=\.)", ".*", name)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"`{k}`" + (f" ×{n}" if n > 1 else "") for k, n in groups.items())


def count(key: str, rank: int = RANK) -> dict:
    """Everything one table row shows, from dpdiff's own `prepare_trainable`."""
    model = MODELS[key]
    family = family_named(model.family)
    base = build(model)
    total = sum(p.numel() for p in base.parameters())
    row = {"key": key, "label": model.label, "family": family.name, "denoiser": model.denoiser_class,
           "total": total, "targets": lora_targets(family), "blocks": len(family.attention_blocks(base))}
    summary = prepare_trainable(base, "full", family=family)
    row["left_frozen"] = [n for n, p in base.named_parameters() if not p.requires_grad]
    row["left_frozen_params"] = total - summary.trainable_params
    row["full"] = (summary.trainable_params, summary.fraction)
    summary = prepare_trainable(build(model), "attention", attention_start_index=0, family=family)
    row["attention"] = (summary.trainable_params, summary.fraction)
    denoiser = build(model)
    try:
        summary = prepare_trainable(denoiser, "lora", rank=rank, family=family)
        row["lora"] = (summary.trainable_params, summary.fraction)
        row["lora_analytic"] = False
    except Exception as e:  # noqa: BLE001  peft could not inject on meta tensors: count the adapters' shapes
        logging.getLogger(__name__).warning("peft LoRA on meta failed for %s (%s): counted analytically", key, e)
        n = analytic_lora_params(build(model), row["targets"], rank)
        row["lora"] = (n, n / (total + n))
        row["lora_analytic"] = True
    return row


def _percent(fraction: float) -> str:
    text = f"{100 * fraction:.3g}"
    if fraction < 1 and float(text) >= 100:  # a few parameters left frozen: show that it is not all of them
        text = f"{100 * fraction:.6f}".rstrip("0")
    return text + "%"


def _cell(value: tuple[int, float]) -> str:
    return f"{value[0]:,} ({_percent(value[1])})"


def markdown(rows: list[dict], rank: int = RANK) -> str:
    lines = [
        f"| model | family | denoiser | params | `lora` r={rank} | `attention` (all blocks) | `full` | attention blocks |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lora = _cell(r["lora"]) + (" ¹" if r["lora_analytic"] else "")
        lines.append(f"| {r['label']} | `{r['family']}` | `{r['denoiser']}` | {r['total']:,} | {lora} | "
                     f"{_cell(r['attention'])} | {_cell(r['full'])} | {r['blocks']} |")
    lines += ["", "| model | default LoRA targets | left frozen (no per-example rule) |", "|---|---|---|"]
    for r in rows:
        frozen = (f"{r['left_frozen_params']:,} params: {summarize_names(r['left_frozen'])}" if r["left_frozen"] else "—")
        lines.append(f"| {r['label']} | {', '.join(f'`{t}`' for t in r['targets'])} | {frozen} |")
    if any(r["lora_analytic"] for r in rows):
        lines += ["", "¹ counted as r·(in + out) per matched `nn.Linear`: peft could not inject on the meta device."]
    return "\n".join(lines)


def docs_section(table: str) -> str:
    return (f"{START}\n<!-- written by `python benchmarks/family_params.py --write_docs`; do not edit by hand -->\n\n"
            f"{table}\n\n{END}")


def write_docs(table: str, path: Path = RECIPES_MD) -> None:
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {START} ... {END} section to replace")
    write_text(path, pattern.sub(lambda _: docs_section(table), text, count=1))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--write_docs", action="store_true", help=f"replace the {START} section of docs/recipes.md")
    parser.add_argument("--verbose", action="store_true", help="show prepare_trainable's warnings (left-frozen names)")
    args = parser.parse_args(argv)
    if not args.verbose:
        logging.getLogger("dpdiff.adapters").setLevel(logging.ERROR)
    rows = [count(key, args.rank) for key in args.models]
    table = markdown(rows, args.rank)
    print(table)
    if args.write_docs:
        if args.models != list(MODELS) or args.rank != RANK:
            raise SystemExit("--write_docs writes the table of every model at the default rank; drop --models/--rank")
        write_docs(table)
    return table


if __name__ == "__main__":
    main()
