"""Epoch time with the latent cache vs encoding every step (same model, data, batch, DP step).

    python benchmarks/latent_cache.py [--examples 2048] [--batch_size 256]

The frozen VAE/text encoder run once per example instead of once per example per epoch. Prints the
two epoch times and their ratio, and writes the `## Latent cache` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import platform
import time

import torch

from dpdiff.adapters import prepare_trainable
from dpdiff.data import load_source
from dpdiff.pipelines import load_pipeline
from dpdiff.pipelines.preset import training_scheduler
from dpdiff.privacy.engine import DPDiffusionEngine
from dpdiff.training.latent_cache import LatentCache, build_latent_cache, encode_images, encode_prompts

from _docs import update_section


class EncodeEveryStep(LatentCache):
    """The same items as the cache, but every access runs the frozen encoders again."""

    def __init__(self, pipeline, images, prompts, resolution):
        self.pipeline, self.images, self.prompts, self.resolution = pipeline, images, prompts, resolution
        self.cond_dropout, self.step = 0.0, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        latents = encode_images(self.pipeline.vae, [self.images[index]], self.resolution, show_progress=False)[0]
        hidden = encode_prompts(self.pipeline.text_encoder, self.pipeline.tokenizer, [self.prompts[index]])[0]
        return {"latents": latents, "encoder_hidden_states": hidden}


def epoch_seconds(pipeline, dataset, batch_size, steps):
    unet = pipeline.unet
    params = [p for p in unet.parameters() if p.requires_grad]
    engine = DPDiffusionEngine(unet, training_scheduler(pipeline), torch.optim.AdamW(params, lr=1e-3), dataset,
                               batch_size=batch_size, physical_batch_size=min(64, batch_size), noise_multiplier=1.0,
                               max_grad_norm=1.0, privacy_seed=0)
    engine.step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps * (len(dataset) / batch_size)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    pipeline = load_pipeline("dpdiff-tiny")
    pipeline.unet.train()
    prepare_trainable(pipeline.unet, "lora", rank=8)
    source = load_source("fashion_mnist", limit=args.examples)
    resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor

    start = time.perf_counter()
    cache = build_latent_cache(pipeline, source, resolution, show_progress=False)
    build = time.perf_counter() - start
    cached = epoch_seconds(pipeline, cache, args.batch_size, args.steps)
    uncached = epoch_seconds(pipeline, EncodeEveryStep(pipeline, source.dataset["image"], source.dataset["prompt"], resolution),
                             args.batch_size, args.steps)
    per_60k = 60000 / args.examples
    rows = [
        "| | seconds per epoch of 60k (extrapolated) |",
        "|---|---:|",
        f"| encode every step | {uncached * per_60k:.0f} |",
        f"| latent cache (training) | {cached * per_60k:.0f} |",
        f"| building the cache (once) | {build * per_60k:.0f} |",
        f"| **speed-up per epoch** | **{uncached / cached:.2f}x** |",
    ]
    text = (f"DP-LoRA (r=8) step on the `dpdiff-tiny` preset, batch {args.batch_size} (physical 64), "
            f"{args.examples} Fashion-MNIST images, {args.steps} timed steps per variant, measured side by side in one run "
            f"by `benchmarks/latent_cache.py` on {platform.machine()} with {torch.get_num_threads()} threads.\n\n" + "\n".join(rows))
    print(text)
    update_section("Latent cache", text)


if __name__ == "__main__":
    main()
