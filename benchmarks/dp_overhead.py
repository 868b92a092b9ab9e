"""What DP-SGD costs over plain fine-tuning: step time and peak memory, DP / non-DP, side by side.

Same denoiser, trainable subset, cached examples, objective and per-example noise/timestep draws; the
DP step is the engine's whole logical step (per-example gradients, flat clipping, one noise draw, SGD
step), the non-DP step plain autograd backward + SGD step. DP and non-DP steps alternate in one
process (a busy machine slows both alike); each row reports the median step times, the median of the
per-pair ratios and their min-max, timed with the allocator as it is in training. Memory, in a second
pass over fresh models: CPU, the step's working memory = peak RSS during the step (sampled every 0.5 ms,
glibc returning blocks >= 64 KiB on free, which slows every step) minus RSS just before; CUDA,
torch.cuda.max_memory_allocated minus the allocation before the step. Max over two steps after a
warm-up; weights and optimizer state are equal for both and not counted.

    python benchmarks/dp_overhead.py                  # CPU, ~10 min: docs/benchmarks.md `## DP overhead` + docs/dp_overhead.png
    python benchmarks/dp_overhead.py --quick          # < 2 min smoke run, prints only
    python benchmarks/dp_overhead.py --rows 'family:sd15*' --quick --json out.json
    python benchmarks/dp_overhead.py --profile 'preset/attention/fused/fp32'   # per op: DP minus non-DP
    python benchmarks/dp_overhead.py --device cuda --gpu --out_md gpu_results.md   # see benchmarks/gpu_check.sh"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _overhead_models as om  # noqa: E402
from _docs import BENCHMARKS_MD, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTES_MARKER = "<!-- notes below: kept by benchmarks/dp_overhead.py -->"
THREADS = 1  # the tiny models run many times slower with 2 threads on 2 shared cores
TIME_TARGET = {"lora": 1.05, "attention": 1.15, "full": 1.5}
MEM_TARGET = {"lora": 1.15, "attention": 1.15}
# the run before this benchmark's rewrite (preset UNet, batch 32; docs/benchmarks.md history)
BEFORE = {("preset", "lora", "hooks"): (1.31, 0.99), ("preset", "lora", "ew"): (1.17, 1.03),
          ("preset", "attention", "hooks"): (1.73, 1.27), ("preset", "full", "hooks"): (2.73, 2.80)}


def cpu_plan(quick: bool, patterns=None) -> list[dict]:
    """One dict per DP variant; variants with the same (group, method, precision) share one non-DP step."""
    rows = []
    # one pair's ratio varies +-5% on this CPU (the same non-DP step timed 0.33-0.36 s in three variants of
    # one run), so a 1.05x target needs ~10-20 pairs; family steps are 10-90 ms: more pairs still
    unet_pairs, family_pairs = (2, 2) if quick else (20, 30)
    wide_pairs = 2 if quick else 10
    for group, pairs in (("preset", unet_pairs), ("wide", wide_pairs)):
        variants = [("lora", m, "fp32") for m in ("fused", "hooks", "ew")]
        if group == "preset":
            variants += [("lora", "auto", "bf16"), ("lora", "hooks", "bf16")]
        variants += [(method, m, "fp32") for method in ("attention", "full") for m in ("fused", "hooks")]
        for method, mode, precision in variants:
            rows.append(dict(group=group, method=method, mode=mode, precision=precision, batch=32, pairs=pairs,
                             build=lambda method, group=group: om.unet_setup(group, method, 32)))
    for build in om.FAMILY_ROWS:
        rows.append(dict(group=f"family:{build}", method="lora", mode="auto", precision="fp32", batch=16,
                         pairs=family_pairs, build=lambda method, build=build: om.family_setup(build, method, 16)))
    if quick and not patterns:  # the smoke run: one variant per kind of row
        keep = {("preset", "lora", "fused", "fp32"), ("preset", "attention", "fused", "fp32"),
                ("family:sd15", "lora", "auto", "fp32")}
        rows = [r for r in rows if (r["group"], r["method"], r["mode"], r["precision"]) in keep]
    return [r for r in rows if not patterns or any(fnmatch.fnmatch(row_id(r), p) for p in patterns)]


def gpu_plan(specs: list[str], methods: list[str], precisions: list[str], device: str, tiny: bool, pairs: int) -> list[dict]:
    """`specs`: SHAPE:LATENT:BATCH (sd15, sdxl, dit); every method runs `auto` (LoRA also `hooks` under bf16)."""
    rows = []
    for spec in specs:
        shape, latent, batch = spec.split(":")
        latent, batch = int(latent), int(batch)
        for precision in precisions:
            for method in methods:
                modes = ["auto", "hooks"] if precision != "fp32" and method == "lora" else ["auto"]
                for mode in modes:
                    rows.append(dict(group=f"{shape} {latent}x{latent}", method=method, mode=mode, precision=precision,
                                     batch=batch, pairs=pairs, build=lambda method, s=shape, l=latent, b=batch:
                                     om.gpu_setup(s, method, b, l, device, tiny)))
    return rows


def row_id(r: dict) -> str:
    return f"{r['group']}/{r['method']}/{r['mode']}/{r['precision']}"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def side_by_side(plain, dp, warmup: int, pairs: int, device) -> dict:
    """Alternating timed steps (the allocator as a training run has it): medians, per-pair ratios."""
    for _ in range(warmup):
        plain()
        dp()
    times = {"plain": [], "dp": []}
    for i in range(pairs):
        order = (("plain", plain), ("dp", dp)) if i % 2 == 0 else (("dp", dp), ("plain", plain))
        for name, fn in order:
            gc.collect()
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    ratios = [d / p for d, p in zip(times["dp"], times["plain"])]
    return dict(t_plain=statistics.median(times["plain"]), t_dp=statistics.median(times["dp"]),
                time_ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))


def step_memory(plain, dp, steps: int, device) -> dict:
    """Max working memory of each step over `steps` steps after one warm-up step each."""
    plain()
    dp()
    memory = {"plain": 0, "dp": 0}
    for _ in range(steps):
        for name, fn in (("plain", plain), ("dp", dp)):
            gc.collect()
            with om.PeakRSS(device) as watch:
                fn()
                sync(device)
            memory[name] = max(memory[name], watch.used)
    return dict(mem_plain_mb=memory["plain"] / 2**20, mem_dp_mb=memory["dp"] / 2**20,
                mem_ratio=memory["dp"] / max(memory["plain"], 1))


def each_row(plan: list[dict], device, measure) -> list[dict]:
    """measure(plain_step, dp_step, row) for every row, fresh models; a failing row records its error."""
    results, plain_cache = [], {}
    for r in plan:
        key = (r["group"], r["method"], r["precision"])
        out = {}
        try:
            if key not in plain_cache:
                plain_cache.clear()  # free the previous model before building the next
                gc.collect()
                plain_cache[key] = om.PlainStep(r["build"](r["method"]), r["precision"])
            dp = om.DPStep(r["build"](r["method"]), r["mode"], r["precision"])
            out["mode_ran"] = dp.engine.grad_sample_mode
            out["trainable"] = sum(p.numel() for p in dp.engine.params)
            out.update(measure(plain_cache[key], dp, r))
            del dp
        except Exception as error:  # a failing variant is a result too: record it, go on
            out["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        if device == "cuda":
            torch.cuda.empty_cache()
        results.append(out)
    plain_cache.clear()
    gc.collect()
    return results


def memory_in_child(plan: list[dict], steps: int) -> list[dict]:
    """CPU memory rows measured by a fresh process of this script: RSS follows a step's working memory only
    when glibc returns every freed block to the OS from the start (a heap already grown by the timing pass
    serves the step from its free lists, and RSS does not move)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory_pass", str(steps), "--json", str(out),
               "--threads", str(torch.get_num_threads()), "--rows", *[row_id(r) for r in plan]]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def run(plan: list[dict], warmup: int, device, memory_steps: int = 2, exact_rss: bool = True) -> list[dict]:
    """Time every row, then measure its memory in a second pass over fresh models (on CPU with `exact_rss`,
    in a child process with glibc set to return freed blocks: that setting makes every step 2-3x slower,
    so it must not be on while steps are timed)."""
    timed = each_row(plan, device, lambda plain, dp, r: side_by_side(plain, dp, warmup, r["pairs"], device))
    if exact_rss and torch.device(device).type == "cpu":
        measured = memory_in_child(plan, memory_steps)
    else:
        measured = each_row(plan, device, lambda plain, dp, r: step_memory(plain, dp, memory_steps, device))
    if len(measured) != len(plan):
        raise RuntimeError(f"memory pass returned {len(measured)} rows for {len(plan)}: the child rebuilds only cpu_plan rows")
    results = []
    for r, t, m in zip(plan, timed, measured):
        out = {k: v for k, v in r.items() if k != "build"}
        out.update(m)
        out.update(t)  # the timing pass's error (if any) wins: without a time the row has no result
        if "error" not in out:
            out["images_per_s_dp"], out["images_per_s_plain"] = r["batch"] / out["t_dp"], r["batch"] / out["t_plain"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}), flush=True)
        results.append(out)
    return results


def verdict(value: float, target: float | None) -> str:
    if target is None:
        return "-"
    return "met" if value <= target else "**missed**"


def table(results: list[dict], gpu: bool = False) -> str:
    head = ("| model | subset | mode (ran) | precision | batch | non-DP s/step | DP s/step | time ratio [min-max] | "
            + ("DP img/s | " if gpu else "") + "time target | step memory MiB non-DP -> DP | memory ratio | memory target | before (time, memory) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        name = f"{r['group']} / {r['method']} / {r['mode']}"
        before = BEFORE.get((r["group"], r["method"], r["mode"])) if r["precision"] == "fp32" else None
        before = f"{before[0]:.2f}x, {before[1]:.2f}x" if before else "-"
        if "error" in r:
            lines.append(f"| {r['group']} | {r['method']} | {r['mode']} | {r['precision']} | {r['batch']} | "
                         f"fails: `{r['error']}` |" + " |" * (head.count("|") - 7) + f" {before} |")
            continue
        tt, mt = TIME_TARGET.get(r["method"]), MEM_TARGET.get(r["method"])
        memory = f"{r['mem_plain_mb']:.0f} -> {r['mem_dp_mb']:.0f} | {r['mem_ratio']:.2f}x | " + (
            f"<= {mt}: {verdict(r['mem_ratio'], mt)}" if mt else "-")
        if max(r["mem_plain_mb"], r["mem_dp_mb"]) < 1 and not gpu:  # RSS pages cannot resolve it
            memory = "< 1 -> < 1 | n/a | n/a (< 1 MiB)"
        lines.append(
            f"| {r['group']} | {r['method']} | {r['mode']} ({r['mode_ran']}) | {r['precision']} | {r['batch']} | "
            f"{r['t_plain']:.3f} | {r['t_dp']:.3f} | {r['time_ratio']:.2f}x [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] | "
            + (f"{r['images_per_s_dp']:.1f} (non-DP {r['images_per_s_plain']:.1f}) | " if gpu else "")
            + f"<= {tt}: {verdict(r['time_ratio'], tt)} | {memory} | {before} |")
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    labels = [f"{r['group']} {r['method']}\n{r['mode_ran']} {r['precision']}" for r in ok]
    x = range(len(ok))
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(ok)), 4.8))
    ax.bar([i - 0.2 for i in x], [r["time_ratio"] for r in ok], 0.4, label="time DP / non-DP",
           yerr=[[r["time_ratio"] - r["ratio_min"] for r in ok], [r["ratio_max"] - r["time_ratio"] for r in ok]],
           capsize=2)
    ax.bar([i + 0.2 for i in x], [r["mem_ratio"] if max(r["mem_plain_mb"], r["mem_dp_mb"]) >= 1 else 0 for r in ok], 0.4,
           label="step memory DP / non-DP (none: < 1 MiB, unresolved)")
    for method, target in TIME_TARGET.items():
        idx = [i for i, r in enumerate(ok) if r["method"] == method]
        if idx:
            ax.hlines(target, min(idx) - 0.45, max(idx) + 0.45, colors="k", linestyles="--", linewidth=0.8)
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xticks(list(x), labels, rotation=70, fontsize=7)
    ax.set_ylabel("ratio (dashed: time target)")
    ax.set_title("DP-SGD overhead over plain fine-tuning (CPU, medians; bars: min-max of per-pair ratios)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def header(results: list[dict], device: str, wall: float) -> str:
    return (f"DP / non-DP on the same denoiser, trainable subset, batch and loss (UNet rows: {om.TOKENS}-token "
            "context; family rows: the tiny builds' own encoders, 8x8 latents). DP = the engine's whole logical step "
            "(per-example gradients, flat clipping, one noise draw, SGD step); non-DP = plain autograd backward + SGD "
            f"step. {device.upper()}, torch.set_num_threads({torch.get_num_threads()}), torch {torch.__version__}; "
            "DP and non-DP steps alternate in one process; time ratio = median of the per-pair ratios [min-max]. "
            + ("Memory = torch.cuda.max_memory_allocated during the step minus the allocation before it"
               if device.startswith("cuda") else "Memory = the step's working memory, measured by a fresh process after the timing (peak RSS during the step minus RSS before")
            + "; weights and optimizer state, equal for both, not counted). `preset` = `load_pipeline(\"dpdiff-tiny\").unet` (32,64), 8x8; "
            "`wide` = (64,128), 2 layers per block, 8x8. Targets (issue 22): time lora <= 1.05x, attention <= 1.15x, "
            "full <= 1.5x; memory <= 1.15x for lora/attention. `before`: the previous run of this benchmark "
            f"(Opacus hooks/ew only). Written by `benchmarks/dp_overhead.py` in {wall / 60:.1f} min; "
            "![DP overhead](dp_overhead.png)")


def write_docs(text: str) -> None:
    old = BENCHMARKS_MD.read_text(encoding="utf-8")
    match = re.search(r"^## DP overhead\n(.*?)(?=^## |\Z)", old, re.S | re.M)
    notes = ""
    if match and NOTES_MARKER in match.group(1):
        notes = match.group(1).split(NOTES_MARKER, 1)[1]
    update_section("DP overhead", text + "\n\n" + NOTES_MARKER + "\n" + notes.strip("\n") + "\n")


def profile(plan: list[dict], pattern: str, device: str, steps: int = 3, top: int = 25) -> list[tuple]:
    """Where the DP step's extra time goes: per op (torch.profiler, self time per step), DP minus non-DP on the
    same row, largest differences first. Returns (op, delta ms, non-DP ms, DP ms, non-DP calls, DP calls) rows."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    r = next((r for r in plan if fnmatch.fnmatch(row_id(r), pattern)), None)
    if r is None:
        raise SystemExit(f"--profile {pattern!r} matches no row; rows: {', '.join(row_id(q) for q in plan)}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    per_op, totals = {}, {}
    for name, step in (("non-DP", om.PlainStep(r["build"](r["method"]), r["precision"])),
                       ("DP", om.DPStep(r["build"](r["method"]), r["mode"], r["precision"]))):
        step()
        sync(device)
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync(device)
        # self time on the device where there is one (kernels), else on the CPU; ms per step
        ms = {e.key: ((getattr(e, "self_device_time_total", 0) if len(activities) > 1 else e.self_cpu_time_total) / 1e3 / steps,
                      e.count / steps) for e in prof.key_averages()}
        per_op[name], totals[name] = ms, sum(v[0] for v in ms.values())
    plain, dp = per_op["non-DP"], per_op["DP"]
    none = (0.0, 0.0)  # an op only one of the two steps runs
    rows = [(k, dp.get(k, none)[0] - plain.get(k, none)[0], plain.get(k, none)[0], dp.get(k, none)[0], plain.get(k, none)[1],
             dp.get(k, none)[1]) for k in set(plain) | set(dp)]
    rows.sort(key=lambda t: -abs(t[1]))
    print(f"== {row_id(r)}: self time per step under the profiler, non-DP {totals['non-DP']:.1f} ms, DP {totals['DP']:.1f} ms "
          f"({totals['DP'] - totals['non-DP']:+.1f} ms); ops by |DP - non-DP|:")
    print(f"{'DP - non-DP ms':>14} {'non-DP ms (calls)':>18} {'DP ms (calls)':>16}  op")
    for k, delta, a, b, ca, cb in rows[:top]:
        print(f"{delta:+14.2f} {a:9.2f} ({ca:5.0f}) {b:8.2f} ({cb:5.0f})  {k[:80]}")
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="< 2 min smoke run (prints only unless --write)")
    parser.add_argument("--rows", nargs="*", default=None, help="fnmatch patterns on GROUP/METHOD/MODE/PRECISION")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=None, help="timed DP/non-DP pairs per row (default: per row)")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu", action="store_true", help="the GPU-sized rows (SD-1.5/SDXL-shaped UNets, DiT-XL/2)")
    parser.add_argument("--gpu_specs", nargs="*", default=["sd15:64:16", "sdxl:128:4", "dit:32:32"],
                        help="SHAPE:LATENT:BATCH, SHAPE in sd15, sdxl, dit")
    parser.add_argument("--methods", nargs="*", default=["lora", "attention"])
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--dry_run", action="store_true", help="with --gpu: the same shapes scaled down (CPU test)")
    parser.add_argument("--profile", metavar="ROW", help="profile one row (fnmatch pattern) instead")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--out_md", type=Path, help="write the table here instead of docs/benchmarks.md")
    parser.add_argument("--from_json", type=Path, help="re-render the docs and chart from a --json of an earlier run")
    parser.add_argument("--wall_min", type=float, default=None, help="with --from_json: that run's minutes")
    parser.add_argument("--write", action="store_true", help="with --quick: write the docs anyway")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--memory_pass", type=int, metavar="STEPS", help=argparse.SUPPRESS)  # memory_in_child's process
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_pass:
        om.release_freed_memory_to_os()
        plan = cpu_plan(False, args.rows)
        rows = each_row(plan, "cpu", lambda plain, dp, r: step_memory(plain, dp, args.memory_pass, "cpu"))
        args.json.write_text(json.dumps(rows))
        return rows
    if args.gpu:
        plan = gpu_plan(args.gpu_specs, args.methods, args.precisions, args.device, args.dry_run, args.pairs or 5)
    else:
        plan = cpu_plan(args.quick, args.rows)
    if args.pairs and not args.gpu:
        for r in plan:
            r["pairs"] = args.pairs
    if args.rows:
        plan = [r for r in plan if any(fnmatch.fnmatch(row_id(r), p) for p in args.rows)]
    if args.profile:
        profile(plan, args.profile, args.device)
        return []
    start = time.perf_counter()
    if args.from_json:
        results, wall = json.loads(args.from_json.read_text()), 60 * (args.wall_min or 0)
    else:
        results = run(plan, args.warmup, args.device, exact_rss=not args.gpu)  # the child rebuilds cpu_plan rows only
        wall = time.perf_counter() - start
    text = header(results, args.device, wall) + "\n\n" + table(results, gpu=args.gpu)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.out_md:
        args.out_md.write_text(text + "\n")
    elif not args.no_write and (not args.quick or args.write) and not args.gpu:
        write_docs(text)
        chart(results, ROOT / "docs" / "dp_overhead.png")
    return results


if __name__ == "__main__":
    main()
