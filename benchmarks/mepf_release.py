"""Cost of DP-MEPF's private step: the whole embedding release (calibration, per-example feature
vectors with layer statistics, per-class sums, noise) divided by a plain forward pass of the same
frozen extractor over the same images. Target: <= 1.10x (the release should be one forward pass).

    python benchmarks/mepf_release.py [--num_images 1000] [--input_size 64] [--rounds 3]

Prints the ratio and writes docs/benchmarks.md `## DP-MEPF` (with the first Fashion-MNIST run kept as
history in results_mepf.json). Timings alternate plain/release rounds so that
load from other processes hits both sides alike."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# a dependency installs its own top-level `benchmarks` package, which shadows this folder: import by path
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _docs import update_section  # noqa: E402
from dpdiff.data import load_source  # noqa: E402
from dpdiff.data.transforms import images_to_tensor  # noqa: E402
from dpdiff.io import write_json  # noqa: E402
from dpdiff.mepf.embedding import EmbeddingConfig, build_extractor  # noqa: E402
from dpdiff.mepf.release import release_embedding  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results_mepf.json"


def plain_forward(extractor, images: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    extractor.pooled(images, batch_size=batch_size, progress=False)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--input_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--moments", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    src = load_source("fashion_mnist", split="train", limit=args.num_images, seed=0)
    images = images_to_tensor(src.dataset["image"], resolution=28, channels=1)
    labels = torch.tensor(src.dataset["label"])
    config = EmbeddingConfig(input_size=args.input_size, moments=args.moments, labelled=True)
    extractor = build_extractor(config, batch_size=args.batch_size)
    extractor.pooled(images[:args.batch_size], progress=False)  # warm-up

    plains, releases = [], []
    for _ in range(args.rounds):  # interleaved, so background load hits both sides alike
        plains.append(plain_forward(extractor, images, args.batch_size))
        start = time.perf_counter()
        release = release_embedding(extractor, images, labels, src.class_names, config, 10.0, 1e-5,
                                    batch_size=args.batch_size, progress=False)
        releases.append(time.perf_counter() - start)
    ratio = min(releases) / min(plains)
    median_ratio = statistics.median(r / p for r, p in zip(releases, plains))
    print(f"plain forward {[round(t, 2) for t in plains]} s, release {[round(t, 2) for t in releases]} s: "
          f"ratio of minima {ratio:.3f}x, median of paired ratios {median_ratio:.3f}x "
          f"(target <= 1.10x; {args.num_images} images at {args.input_size}px, D={release.tensors['sum1'].shape[1]})")

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["release_speed"] = {
        "num_images": args.num_images, "input_size": args.input_size, "batch_size": args.batch_size,
        "moments": args.moments, "embedding_dim": int(release.tensors["sum1"].shape[1]),
        "plain_forward_s": [round(t, 3) for t in plains], "release_s": [round(t, 3) for t in releases],
        "ratio": round(ratio, 3), "median_paired_ratio": round(median_ratio, 3),
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
    }
    write_json(RESULTS, results)
    update_section("DP-MEPF", render(results))
    return 0


def render(results: dict) -> str:
    lines = []
    speed = results.get("release_speed")
    if speed:
        lines += [
            "Written by `benchmarks/mepf_release.py`. DP-MEPF's utility is measured by `benchmarks/utility.py` "
            "(its `mepf` rows in `## Utility`).",
            "",
            "### Cost of the private release",
            "",
            "The whole DP release (calibration, per-example feature vectors from the hooked layers, "
            "per-class sums, noise) against a plain forward pass of the same frozen EfficientNet-Lite0 over "
            "the same images, interleaved plain/release rounds on a shared CPU; ratio of the fastest of each "
            "(the least disturbed by other processes) and the median of the paired ratios.",
            "",
            "| images | extractor input | embedding dim | plain forward (s) | release (s) | ratio (min/min) | median paired ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {speed['num_images']} Fashion-MNIST | {speed['input_size']}px | {speed['embedding_dim']} | "
            f"{' / '.join(f'{t:.2f}' for t in speed['plain_forward_s'])} | {' / '.join(f'{t:.2f}' for t in speed['release_s'])} | "
            f"**{speed['ratio']:.2f}x** (target <= 1.10x) | {speed['median_paired_ratio']:.2f}x |",
            "",
            f"Machine: {speed['machine']}.",
        ]
    run = results.get("fashion_mnist_run")
    if run:
        lines += ["", "### Fashion-MNIST at epsilon = 10 (history)", "",
                  "The first CPU-sized DP-MEPF run (2026-12, by `benchmarks/mepf_fashion.py`, since removed: its code "
                  "is in git history; `## Utility`'s mepf rows supersede it):", ""] + run["markdown"].strip().splitlines()
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
