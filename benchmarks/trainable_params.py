"""How many parameters each trainable subset trains: the tiny preset UNet and an SD-1.5-shaped UNet
(built on the meta device, so no memory is used). Prints the table and writes it to
docs/benchmarks.md `## Trainable parameters`.

    python benchmarks/trainable_params.py"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _docs import update_section  # noqa: E402  (benchmarks/ is sys.path[0]; a site-packages "benchmarks" shadows the folder)
from dpdiff.adapters import attention_blocks, prepare_trainable  # noqa: E402
from dpdiff.pipelines.preset import UNET_CONFIG  # noqa: E402

SD15_CONFIG = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                   layers_per_block=2, sample_size=64)
MODELS = {"tiny preset": UNET_CONFIG, "SD-1.5 shape": SD15_CONFIG}


def subsets() -> list[tuple[str, str, dict]]:
    return [
        ("lora r=4 (to_q,k,v,out)", "lora", dict(rank=4)),
        ("lora r=16", "lora", dict(rank=16)),
        ("lora r=4 + time embedding", "lora", dict(rank=4, train_condition_embedder=True)),
        ("attention (all blocks)", "attention", dict(attention_start_index=0)),
        ("attention (second half of the blocks)", "attention", {}),
        ("full", "full", {}),
    ]


def build(config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def main() -> None:
    rows = []
    blocks = {name: len(attention_blocks(build(config))) for name, config in MODELS.items()}
    for label, method, kwargs in subsets():
        cells = [label]
        for name, config in MODELS.items():
            if "second half" in label:  # the same relative depth on each model
                kwargs = dict(attention_start_index=blocks[name] // 2)
            summary = prepare_trainable(build(config), method, **kwargs)
            cells.append(f"{summary.trainable_params:,} ({100 * summary.fraction:.2f}%)")
        rows.append(cells)
    totals = [f"{sum(p.numel() for p in build(c).parameters()):,}" for c in MODELS.values()]
    lines = [
        "Parameters that receive per-sample gradients and DP noise (share of the UNet, adapters included). "
        f"UNet sizes: tiny preset {totals[0]}, SD-1.5 shape {totals[1]}. "
        "Written by `benchmarks/trainable_params.py`; the SD-1.5 UNet is built on the meta device.",
        "",
        "| subset | " + " | ".join(MODELS) + " |",
        "|---|" + "---:|" * len(MODELS),
    ] + ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    update_section("Trainable parameters", table)


if __name__ == "__main__":
    main()
