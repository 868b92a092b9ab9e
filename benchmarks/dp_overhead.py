"""What DP-SGD costs over plain fine-tuning: step time and peak memory, DP / non-DP, side by side.

Same UNet, same trainable subset, same 32 cached examples (collated each step by both); the DP step is
the engine's full logical step (per-sample gradients, clipping, one noise draw, optimizer step).
Time: DP and non-DP steps alternate (so a busy machine slows both alike); medians of the timed
steps. Memory (CPU): resident set size sampled every 0.5 ms from /proc/self/statm while each
timed step runs, with glibc returning every allocation >= 64 KiB to the OS on free (mallopt):
the step's working memory = peak RSS during the step minus RSS just before it (activations,
gradients, per-sample gradients, noise); the max over the timed steps. Weights and optimizer
state are the same for both and not counted.

    python benchmarks/dp_overhead.py             # writes docs/benchmarks.md `## DP overhead`
    python benchmarks/dp_overhead.py --profile wide lora hooks"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _docs import update_section  # noqa: E402  (benchmarks/ is sys.path[0]; a site-packages "benchmarks" shadows it)
from dpdiff.adapters import prepare_trainable  # noqa: E402
from dpdiff.pipelines.preset import SCHEDULER_CONFIG, build_tiny_unet  # noqa: E402
from dpdiff.privacy.diffusion_loss import per_row_loss  # noqa: E402
from dpdiff.privacy.engine import DPDiffusionEngine  # noqa: E402

BATCH = 32
TOKENS = 8
MODELS = {  # timed steps per variant: more where a step is short, so a busy machine averages out
    "preset (32,64) 8x8": dict(latent=8, overrides={}, steps=8),
    "wide (128,256) 16x16": dict(latent=16, overrides=dict(block_out_channels=(128, 256), sample_size=16), steps=3),
}
# every mode on the preset; on the wide UNet (8-30 s a step on this CPU) the default and the fast candidate
VARIANTS = {
    "preset (32,64) 8x8": {"lora": ("hooks", "ew", "functorch"), "attention": ("hooks", "functorch"),
                           "full": ("hooks", "functorch")},
    "wide (128,256) 16x16": {"lora": ("hooks", "ew"), "attention": ("hooks",), "full": ("hooks",)},
}


class LatentCache(torch.utils.data.Dataset):
    def __init__(self, n, latent):
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(n, 4, latent, latent, generator=g)
        self.hidden = torch.randn(n, TOKENS, 64, generator=g)

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": self.latents[i], "encoder_hidden_states": self.hidden[i]}


def build(model: str, method: str):
    unet = build_tiny_unet(seed=0, **MODELS[model]["overrides"])
    prepare_trainable(unet, method)
    return unet


class PlainStep:
    """Non-private fine-tuning step as a plain loop does it: collate the cached examples, draw noise and
    timesteps, mean loss, backward, step."""

    def __init__(self, unet, data):
        self.unet, self.scheduler, self.data = unet, DDPMScheduler(**SCHEDULER_CONFIG), data
        self.optimizer = torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self):
        batch = default_collate([self.data[i] for i in range(len(self.data))])
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=self.generator)
        timesteps = torch.randint(0, 1000, (len(latents),), generator=self.generator)
        loss = per_row_loss(self.unet, self.scheduler, latents, batch["encoder_hidden_states"], noise, timesteps)
        loss.mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class DPStep:
    def __init__(self, unet, data, mode):
        params = [p for p in unet.parameters() if p.requires_grad]
        self.engine = DPDiffusionEngine(
            unet, DDPMScheduler(**SCHEDULER_CONFIG), torch.optim.SGD(params, lr=1e-4), data,
            batch_size=BATCH, physical_batch_size=BATCH, noise_multiplier=1.0, max_grad_norm=1.0,
            grad_sample_mode=mode, privacy_seed=0,
        )
        self.indices = list(range(len(data)))

    def __call__(self):
        self.engine._logical_step(self.indices)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest RSS seen while the block runs (sampled from a thread; torch ops release the GIL)."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def release_freed_memory_to_os():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so large blocks are unmapped on free
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD


def measure_side_by_side(plain, dp, warmup, steps):
    """Median seconds per step and max working memory (bytes) of each, steps alternating."""
    for _ in range(warmup):
        plain()
        dp()
    times, memory = {"plain": [], "dp": []}, {"plain": 0, "dp": 0}
    for _ in range(steps):
        for name, fn in (("plain", plain), ("dp", dp)):
            gc.collect()
            before = rss()
            with PeakRSS() as watch:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            memory[name] = max(memory[name], watch.peak - before)
    return statistics.median(times["plain"]), statistics.median(times["dp"]), memory["plain"], memory["dp"]


def run(warmup: int, steps: int | None) -> list[dict]:
    rows = []
    for model, spec in MODELS.items():
        data = LatentCache(BATCH, spec["latent"])
        for method, modes in VARIANTS[model].items():
            plain = PlainStep(build(model, method), data)
            for mode in modes:
                dp = DPStep(build(model, method), data, mode)
                t_plain, t_dp, m_plain, m_dp = measure_side_by_side(plain, dp, warmup, steps or spec["steps"])
                del dp
                row = dict(model=model, method=method, mode=mode, t_plain=t_plain, t_dp=t_dp,
                           time_ratio=t_dp / t_plain, mem_plain_mb=m_plain / 2**20, mem_dp_mb=m_dp / 2**20,
                           mem_ratio=m_dp / m_plain)
                print(" | ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
                rows.append(row)
            del plain
    return rows


def table(rows: list[dict], wall: float) -> str:
    lines = [
        f"DP / non-DP on the same UNet, trainable subset, batch ({BATCH} examples, {TOKENS}-token context, "
        "fresh diffusion draws each step). DP = the engine's whole logical step (per-sample gradients, flat clipping, "
        f"one noise draw, SGD step). CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}; median "
        "of timed steps that alternate DP and non-DP. Memory = the step's working memory: peak RSS during "
        "the step minus RSS just before it (see the script's docstring; weights and optimizer state, equal for "
        "both, are not counted). "
        f"Written by `benchmarks/dp_overhead.py` in {wall / 60:.1f} min.",
        "",
        "| model | subset | grad_sample_mode | non-DP s/step | DP s/step | time ratio | step memory MiB "
        "(non-DP -> DP) | memory ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['mode']} | {r['t_plain']:.3f} | {r['t_dp']:.3f} | "
            f"{r['time_ratio']:.2f}x | {r['mem_plain_mb']:.0f} -> {r['mem_dp_mb']:.0f} | {r['mem_ratio']:.2f}x |"
        )
    return "\n".join(lines)


NOTES = """
**Default mode: `grad_sample_mode="hooks"`.** It is the only mode that runs all three subsets: `ew`
fails inside torch's expanded-weights conv backward on the UNet's non-contiguous gradients (the
1x1 `proj_in`/`proj_out` of every Transformer2DModel, the resnets), so the engine refuses `ew`
whenever a convolution trains; `functorch` is slower everywhere. For LoRA (only Linear layers
train) `ew` is correct (tested against the one-example loop) and faster on small models: pass
`grad_sample_mode="ew"` there.

**Where the time goes** (`--profile preset attention hooks`, torch.profiler, 3 steps, self CPU;
measured 2026-11-29 on this 2-core machine): the DP step adds Opacus' Python backward hooks
(`BackwardHookFunction`, 0.61 s of 5.1 s), the per-sample weight gradients (`bmm`, 0.57 s), computed
*in addition to* autograd's ordinary weight gradients, which the DP step then overwrites with the
clipped sum + noise, zero-fills of per-sample and noise buffers (`fill_`, 0.36 s) and the clipping
products (`mul`, 0.26 s). Together about 1.8 s per 3 steps, which is the measured overhead. So the
cost grows with the share of the UNet that trains (LoRA ~2%, attention ~41%, full 100%) and, for
small models, with the fixed per-module hook cost. Memory: per-sample gradients are batch x
trainable parameters (full: 32 x 1.08M floats = 132 MiB on the preset), the rest is unchanged.

**How far to trust the time ratios:** this machine has 2 cores shared with other jobs (load
average ~5 while it ran). The wide rows have 3 timed steps of 13-30 s each and move by +-0.3
between runs (wide lora hooks: 1.04x in a run at lower load, 1.37x in the run above; lora ew
1.00x and 0.88x); the preset rows (8 timed steps) are steadier (lora hooks 1.30x and 1.31x,
attention hooks 1.72x and 1.73x). Memory ratios are stable across runs.

**Targets** (lora <= 1.10x, attention <= 1.15x time; memory <= 1.15x): LoRA meets the memory
target everywhere and the time target on the wide UNet at low load (1.04x hooks, 1.00x ew); on
the 0.7-1.2 s preset step the fixed hook cost shows (1.3x; `ew` 1.11-1.17x). Attention misses
both (time 1.5-1.7x, memory 1.20-1.27x: the doubled weight-gradient work and the per-sample
gradients of 41% of the UNet). Ways to close the gap, not done yet: skip autograd's ordinary
weight gradient for the trainable layers (Opacus cannot), or make the conv gradients contiguous
so that `ew` runs on attention blocks too.
"""


def profile(model: str, method: str, mode: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    data = LatentCache(BATCH, MODELS[model]["latent"])
    for name, step in (("non-DP", PlainStep(build(model, method), data)), ("DP", DPStep(build(model, method), data, mode))):
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(f"== {name} {model} {method} {mode}: top ops by self CPU time (3 steps)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: per model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", nargs=3, metavar=("MODEL", "METHOD", "MODE"),
                        help="profile one variant instead; MODEL is 'preset' or 'wide'")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    release_freed_memory_to_os()
    if args.profile:
        model = next(m for m in MODELS if m.startswith(args.profile[0]))
        profile(model, args.profile[1], args.profile[2])
        return
    start = time.perf_counter()
    rows = run(args.warmup, args.steps)
    text = table(rows, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        update_section("DP overhead", text + "\n" + NOTES)


if __name__ == "__main__":
    main()
