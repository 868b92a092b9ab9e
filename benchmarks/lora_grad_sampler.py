"""LoRA DP-SGD step time by per-sample-gradient mode (Opacus hooks, ew, dpdiff's fused_lora) vs plain training.

All variants run side by side in one process on the same UNet shape, LoRA (rank 8 on to_q, to_k,
to_v, to_out.0), 32 cached examples and 8-token context; the timed repeats interleave the variants
(rotating their order), medians reported. The DP step = what DPDiffusionEngine does per logical step:
collate, draw noise/timesteps, forward/backward through the per-sample wrapper, Opacus DPOptimizer
(flat clipping, one noise draw, SGD step). Non-DP = benchmarks/dp_overhead.py's PlainStep.

    python benchmarks/lora_grad_sampler.py                  # preset + wide UNet, all modes
    python benchmarks/lora_grad_sampler.py --models preset --repeats 12
    python benchmarks/lora_grad_sampler.py --ghost          # ghost norm vs materialised per-example norm"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from opacus.optimizers import DPOptimizer
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dp_overhead import LatentCache, PlainStep, release_freed_memory_to_os  # noqa: E402
from dpdiff.adapters import prepare_trainable  # noqa: E402
from dpdiff.pipelines.preset import SCHEDULER_CONFIG, build_tiny_unet  # noqa: E402
from dpdiff.privacy.diffusion_loss import per_row_loss  # noqa: E402
from dpdiff.privacy.grad_samplers import FUSED_MODE, wrap_for_per_sample_grads  # noqa: E402

BATCH = 32
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MODELS = {
    "preset (32,64) x1, 8x8": dict(latent=8, overrides={}),
    "wide (64,128) x2, 16x16": dict(latent=16, overrides=dict(block_out_channels=(64, 128), layers_per_block=2,
                                                               sample_size=16)),
}
DP_MODES = ("hooks", "ew", FUSED_MODE)


def build(model: str, rank: int):
    unet = build_tiny_unet(seed=0, **MODELS[model]["overrides"])
    prepare_trainable(unet, "lora", rank=rank, target_modules=TARGETS)
    return unet


class DPStep:
    """The engine's logical step on one physical batch, with the per-sample wrapper of `mode`."""

    def __init__(self, unet, data, mode):
        self.module = wrap_for_per_sample_grads(unet, mode)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = DPOptimizer(torch.optim.SGD(self.params, lr=1e-4), noise_multiplier=1.0, max_grad_norm=1.0,
                                     expected_batch_size=BATCH, loss_reduction="mean",
                                     generator=torch.Generator().manual_seed(0))
        self.scheduler, self.data = DDPMScheduler(**SCHEDULER_CONFIG), data
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self):
        self.module.train()
        batch = default_collate([self.data[i] for i in range(len(self.data))])
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=self.generator)
        timesteps = torch.randint(0, 1000, (len(latents),), generator=self.generator)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_row_loss(self.module, self.scheduler, latents, batch["encoder_hidden_states"], noise, timesteps).mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def run_model(model: str, rank: int, warmup: int, repeats: int) -> dict:
    data = LatentCache(BATCH, MODELS[model]["latent"])
    steps = {"non-DP": PlainStep(build(model, rank), data)}
    for mode in DP_MODES:
        steps[mode] = DPStep(build(model, rank), data, mode)
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no variant always runs first
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ghost_vs_materialised(batch=32, rank=8, dims=(64, 128, 320), tokens=(8, 64, 256, 1024), repeats=5) -> list[str]:
    """Per-example gradient norms of one LoRA Linear (A: r x d, B: d x r): materialised (bmm, then norm) vs
    ghost (sum_{t,t'} (g_t.g_t')(a_t.a_t'), no per-example gradient). Same numbers, checked."""
    lines = ["| d | T | materialised ms | ghost ms | ghost / materialised |", "|---:|---:|---:|---:|---:|"]
    for d in dims:
        for t in tokens:
            x, g = torch.randn(batch, t, d), torch.randn(batch, t, d)
            a, b = torch.randn(rank, d), torch.randn(d, rank)
            h, gh = x @ a.T, g @ b

            def materialised():
                nb = torch.bmm(g.transpose(1, 2), h).flatten(1).pow(2).sum(1)
                na = torch.bmm(gh.transpose(1, 2), x).flatten(1).pow(2).sum(1)
                return nb + na

            def ghost():
                nb = (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(h, h.transpose(1, 2))).sum((1, 2))
                na = (torch.bmm(gh, gh.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))).sum((1, 2))
                return nb + na

            torch.testing.assert_close(ghost(), materialised(), rtol=1e-3, atol=1e-2)
            timed = {}
            for name, fn in (("m", materialised), ("g", ghost)):
                fn()
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - start)
                timed[name] = statistics.median(samples) * 1e3
            lines.append(f"| {d} | {t} | {timed['m']:.2f} | {timed['g']:.2f} | {timed['g'] / timed['m']:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["preset", "wide"], help="preset and/or wide")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 10 preset, 4 wide)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ghost", action="store_true", help="only the ghost-norm micro-benchmark")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    release_freed_memory_to_os()
    if args.ghost:
        print(f"per-example norms of a rank-8 LoRA Linear, batch 32, {args.threads} thread(s)")
        print("\n".join(ghost_vs_materialised()))
        return
    lines = [f"LoRA r{args.rank} on {', '.join(TARGETS)}, batch {BATCH}, CPU {args.threads} thread(s), torch "
             f"{torch.__version__}; median s/step over interleaved repeats",
             "", "| model | non-DP s | hooks s | ew s | fused_lora s | hooks / non-DP | ew / non-DP | fused_lora / non-DP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in args.models:
        model = next(m for m in MODELS if m.startswith(key))
        repeats = args.repeats or (10 if key == "preset" else 4)
        t = run_model(model, args.rank, args.warmup, repeats)
        base = t["non-DP"]
        lines.append(f"| {model} | {base:.3f} | " + " | ".join(f"{t[m]:.3f}" for m in DP_MODES) + " | "
                     + " | ".join(f"{t[m] / base:.2f}x" for m in DP_MODES) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
