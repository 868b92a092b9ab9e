"""Real model sizes: one DP step and one non-DP step at the real configs, beside the memory plan's estimate.

SD-1.5's UNet at 64x64 latents, SDXL's at 128x128, PixArt-alpha's transformer (28 blocks x 1152) at 64x64,
random init from the configs in benchmarks/_overhead_models.py; frozen weights in bf16, trained parameters
fp32, forward/backward under bf16 autocast (what `--mixed_precision bf16` runs); LoRA (rank 8) or
`attention`; with and without gradient checkpointing; physical batch 1 or 4; AdamW as the training loop.

Each row runs in a fresh subprocess: the non-DP step (plain autograd + AdamW) first, then the engine's whole
DP step on the same examples (per-example gradients, flat clipping, one noise draw, AdamW). Peak memory is
the process's highest RSS during a step (sampled every 0.5 ms; glibc returns freed blocks >= 64 KiB), or
on CUDA torch.cuda.max_memory_allocated plus what was allocated before; the plan (dpdiff/training/
memory_plan.py, from the config on the meta device) is computed in the parent for the same settings.
Rows whose plan exceeds --max_gib are skipped (the plan refusing them is what a run would see).

    python benchmarks/real_shapes.py                       # the default rows (~30 min on 2 CPU cores)
    python benchmarks/real_shapes.py --rows sd15:lora:1:0 --repeats 1 --no_docs
    python benchmarks/real_shapes.py --plan_only           # estimates only, seconds
    python benchmarks/real_shapes.py --device cuda --rows ... --out_md $OUT/real_shapes.md   # gpu_check.sh"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _overhead_models as om  # noqa: E402

GIB = 2**30
NOTES_MARKER = "<!-- notes below: kept by benchmarks/real_shapes.py -->"
LATENT = {"sd15": 64, "sdxl": 128, "pixart": 64}
# shape:method:physical batch:checkpointing, cheapest first: the subset that fits ~30 min on 2 quiet CPU cores
# (PixArt `attention` trains nearly the whole transformer: 12.8 GiB planned, left out on a shared 24 GB machine;
# SDXL's non-DP step is left out on a CPU, ~10 min a step)
DEFAULT_ROWS = ("pixart:lora:1:0", "pixart:lora:1:1", "pixart:lora:4:0", "sd15:lora:1:0", "sd15:lora:1:1",
                "sd15:attention:1:0", "sd15:attention:1:1", "sd15:lora:4:1", "sdxl:lora:1:1")
CPU_DP_ONLY = ("sdxl:lora:1:1",)


def parse_row(row: str) -> dict:
    """shape:method:batch:checkpointing[:latent], e.g. sdxl:lora:1:1 or pixart:lora:4:0:128 (PixArt-alpha 1024-MS)."""
    shape, method, batch, ckpt, *latent = row.split(":")
    return dict(shape=shape, method=method, batch=int(batch), checkpointing=bool(int(ckpt)),
                latent=int(latent[0]) if latent else LATENT[shape])


def row_key(r: dict) -> str:
    latent = "" if r["latent"] == LATENT[r["shape"]] else f":{r['latent']}"
    return f"{r['shape']}:{r['method']}:{r['batch']}:{int(r['checkpointing'])}{latent}"


def planned_bytes(r: dict, device: str) -> int:
    """The plan's peak; on CUDA without the context, which torch.cuda.max_memory_allocated does not see."""
    plan = plan_row(r, device)
    return plan.peak_bytes - (plan.runtime_bytes if torch.device(device).type == "cuda" else 0)


def plan_row(r: dict, device: str = "cpu"):
    """The memory plan of this row: the same config on the meta device, no EMA (the benchmark keeps none)."""
    from dpdiff.training.memory_plan import plan_denoiser

    with torch.device("meta"):
        model, family = om.real_shape_model(r["shape"], r["latent"])
    tokens = om.PIXART_TOKENS if r["shape"] == "pixart" else 77
    return plan_denoiser(family, model, method=r["method"], precision="bf16", rows=r["batch"], latent=(r["latent"],) * 2,
                         text_tokens=tokens, resolution=r["latent"] * 8, gradient_checkpointing=r["checkpointing"],
                         ema=False, device=torch.device(device))


# ---- the child: one row, fresh process ----------------------------------------------------------

def measure(r: dict, device: str, repeats: int, threads: int, plain: bool = True) -> dict:
    from torch.utils.data import default_collate

    from dpdiff.adapters import prepare_trainable
    from dpdiff.pipelines.loading import cast_frozen
    from dpdiff.privacy.diffusion_loss import example_generator
    from dpdiff.privacy.engine import DPDiffusionEngine
    from dpdiff.training.latent_cache import LatentCache

    torch.set_num_threads(threads)
    om.release_freed_memory_to_os()
    cuda = torch.device(device).type == "cuda"
    start_rss = om.rss()
    t0 = time.perf_counter()
    model, family = om.real_shape_model(r["shape"], r["latent"], dtype=torch.bfloat16, device=device)
    prepare_trainable(model, r["method"], rank=8, family=family)
    cast_frozen(model, torch.bfloat16)
    if r["checkpointing"]:
        model.enable_gradient_checkpointing()
    family.train_mode(model)
    n = r["batch"]
    latents = torch.randn(n, 4, r["latent"], r["latent"], generator=torch.Generator().manual_seed(1))
    data = LatentCache.per_example(latents, om.real_shape_conditions(r["shape"], n, r["latent"]))
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    objective = family.objective(om._ddpm())
    indices = list(range(n))

    def plain_step(state={"step": 0}):  # noqa: B006 (the step counter keys the draws, as the engine's)
        batch = default_collate([data[i] for i in indices])
        x = batch["latents"].to(device)
        conditions = {k: batch[k].to(device) for k in family.condition_keys}
        noise, t = objective.draw(x, 1, [example_generator(0, state["step"], i) for i in indices])
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = objective.per_row_loss(lambda xt, tt: family.predict(model, xt, tt, conditions), x, noise, t).mean()
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        state["step"] += 1

    def timed(step) -> tuple[list[float], list[float], int]:
        """(wall seconds, process CPU seconds, peak bytes): the first step under the RSS sampler (the peak), the
        others timed without it (its 0.5 ms polling costs CPU); CPU time is what a busy shared machine distorts least."""
        walls, cpus, peak = [], [], 0
        for i in range(repeats):
            with om.PeakRSS(device) if i == 0 else contextlib.nullcontext() as p:
                t, c = time.perf_counter(), time.process_time()
                step()
                if cuda:
                    torch.cuda.synchronize()
                walls.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
            if i == 0:
                peak = p.before + p.used
        if repeats > 1:  # the sampled first step is a warm-up for the timing
            walls, cpus = walls[1:], cpus[1:]
        return walls, cpus, peak

    result = dict(r, device=device, threads=threads, repeats=repeats, start_bytes=start_rss, build_s=build_s)
    if plain:
        plain_opt = torch.optim.AdamW(params, lr=1e-5)
        plain_times, plain_cpu, plain_peak = timed(plain_step)
        plain_opt.state.clear()
        del plain_opt
        result |= dict(plain_s=plain_times, plain_cpu_s=plain_cpu, plain_peak_bytes=plain_peak)
        print(json.dumps(result), flush=True)  # a row stopped in its DP step keeps its non-DP half
    engine = DPDiffusionEngine(model, om._ddpm(), torch.optim.AdamW(params, lr=1e-5), data, batch_size=n,
                               physical_batch_size=n, noise_multiplier=1.0, max_grad_norm=1.0, privacy_seed=0,
                               family=family, precision="bf16")
    dp_times, dp_cpu, dp_peak = timed(lambda: engine._logical_step(indices))
    return result | dict(grad_sample_mode=engine.grad_sample_mode, dp_s=dp_times, dp_cpu_s=dp_cpu, dp_peak_bytes=dp_peak)


# ---- the parent: rows in subprocesses, table ----------------------------------------------------

def run_row(row: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", row, "--device", args.device, "--repeats", str(args.repeats_for(row)),
           "--threads", str(args.threads)] + (["--child_dp_only"] if row in args.dp_only else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
        stdout, error = out.stdout, None if out.returncode == 0 else f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired as e:
        stdout, error = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), f"timed out after {args.row_timeout} s"
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        return dict(parse_row(row), error=error or "no result")
    return json.loads(lines[-1]) | ({"error": error} if error else {})


def table(results: list[dict]) -> str:
    head = ("| model | method | batch | ckpt | DP peak (GiB) | plan (GiB) | plan / DP peak | non-DP peak | "
            "DP / non-DP memory | DP step (s) | non-DP step (s) | DP / non-DP time | DP / non-DP CPU time | note |\n|" + "---|" * 14)
    lines = [head]
    for r in results:
        dp, plain, plan = r.get("dp_peak_bytes"), r.get("plain_peak_bytes"), r.get("plan_bytes")
        ratio = lambda a, b, fmt="{:.2f}x": fmt.format(a / b) if a and b else "-"  # noqa: E731
        fastest = lambda key: min(r[key]) if r.get(key) else None  # noqa: E731
        cells = [f"{r['shape']} {r['latent']}x{r['latent']}", r["method"], str(r["batch"]), "yes" if r["checkpointing"] else "no",
                 f"{dp / GIB:.2f}" if dp else "-", f"{plan / GIB:.2f}" if plan else "-", ratio(plan, dp, "{:.2f}"),
                 f"{plain / GIB:.2f}" if plain else "-", ratio(dp, plain),
                 f"{fastest('dp_s'):.1f}" if fastest("dp_s") else "-", f"{fastest('plain_s'):.1f}" if fastest("plain_s") else "-",
                 ratio(fastest("dp_s"), fastest("plain_s")), ratio(fastest("dp_cpu_s"), fastest("plain_cpu_s")),
                 r.get("skipped") or r.get("error") or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="shape:method:batch:checkpointing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2, help="steps per kind and row (the fastest is reported); 1 for batch 4 and SDXL")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max_gib", type=float, default=14.0, help="skip rows whose plan exceeds this (shared 24 GB machine)")
    p.add_argument("--row_timeout", type=int, default=900)
    p.add_argument("--plan_only", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--out_md", default=None, help="write the table here instead of docs/benchmarks.md")
    p.add_argument("--no_docs", action="store_true")
    p.add_argument("--from_json", nargs="+", default=None, help="build the table from rows measured earlier (--json files; "
                   "the plan is recomputed with today's code); later files win for the same row")
    p.add_argument("--dp_only", nargs="*", default=None, help="rows measured without the non-DP step (default on a CPU: SDXL, ~10 min a step)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_dp_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(parse_row(args.child), args.device, args.repeats, args.threads, plain=not args.child_dp_only)),
              flush=True)
        return
    if args.dp_only is None:
        args.dp_only = list(CPU_DP_ONLY) if args.device == "cpu" else []
    # a CPU step of batch 4 or SDXL takes minutes: one of each there
    args.repeats_for = lambda row: (1 if args.device == "cpu" and (parse_row(row)["batch"] > 1 or row.startswith("sdxl"))
                                    else args.repeats)
    results = []
    if args.from_json:
        measured = {}
        for file in args.from_json:
            for r in json.loads(Path(file).read_text()):
                if "dp_s" in r or "plain_s" in r:
                    measured[row_key(r)] = r
        order = {"sd15": 0, "sdxl": 1, "pixart": 2}
        rows = sorted(measured.values(), key=lambda r: (order[r["shape"]], r["method"] != "lora", r["batch"], r["checkpointing"]))
        results = [dict(r, plan_bytes=planned_bytes(r, r["device"])) for r in rows]
        args.rows = []
    for row in args.rows:
        r = parse_row(row)
        plan = planned_bytes(r, args.device)
        if args.plan_only:
            results.append(dict(r, plan_bytes=plan, skipped="plan only"))
        elif plan > args.max_gib * GIB:
            results.append(dict(r, plan_bytes=plan, skipped=f"plan {plan / GIB:.1f} GiB > --max_gib {args.max_gib:g}"))
        else:
            t = time.time()
            results.append(dict(run_row(row, args), plan_bytes=plan))
            print(f"{row}: {time.time() - t:.0f} s", json.dumps(results[-1]), flush=True)
            if args.json:  # after every row: a long run stopped early keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.out_md:
        Path(args.out_md).write_text(text + "\n")
    elif not args.no_docs and not args.plan_only:
        import re

        from _docs import BENCHMARKS_MD, update_section

        old = BENCHMARKS_MD.read_text(encoding="utf-8") if BENCHMARKS_MD.exists() else ""
        match = re.search(r"^## Real shapes\n(.*?)(?=^## |\Z)", old, re.S | re.M)
        notes = match.group(1).split(NOTES_MARKER, 1)[1] if match and NOTES_MARKER in match.group(1) else ""
        update_section("Real shapes", _section(text, args) + "\n\n" + NOTES_MARKER + "\n" + notes.strip("\n") + "\n")


def _section(text: str, args) -> str:
    return (f"`python benchmarks/real_shapes.py` ({args.device}, {args.threads} threads; random init from the real configs; "
            "bf16 frozen weights, fp32 trained parameters, bf16 autocast; LoRA rank 8; AdamW; peak = the process's "
            "highest RSS during a step, weights included; plan = dpdiff/training/memory_plan.py from the config on the "
            "meta device; on CUDA without the context). Step times: wall and process CPU seconds, the fastest "
            "of the timed repeats; the CPU-time ratio is what a busy shared machine distorts least.\n\n" + text)


if __name__ == "__main__":
    main()
