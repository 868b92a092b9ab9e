"""Privacy-utility benchmark on Fashion-MNIST: every method at every epsilon, trained on the same
private data, sampled, and scored by the same protocol, with three references (real data; real
data through the base pipeline's VAE; a NON-private LoRA fine-tune) and the published numbers beside ours.

    python benchmarks/utility.py                       # the complete benchmark (GPU-sized)
    python benchmarks/utility.py --methods lora --epsilons 10 --max_train_samples 10000 --epochs 1 --num_per_class 200

Per run: train -> sample N per class (28x28 grey) -> train CNN/LogReg/MLP on it and test them on the
real test set -> FD (EfficientNet-Lite0) on a fixed sample count; CPU and wall time of each phase.
Writes results.json after every run (`--skip_existing` resumes), plots under --docs_dir and the
`## Utility` section of docs/benchmarks.md. A run with any scaled-down option is labelled
"reduced"; `--smoke` labels every number as from a smoke run (tests only)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # a dependency ships a top-level `benchmarks` package

from _docs import BENCHMARKS_MD  # noqa: E402
from _utility_report import CHANNELS, DATASET, DP_SGD_METHODS, IMAGE_REFERENCES, METHODS, PUBLISHED, REFERENCES, RESOLUTION, load_images, render_docs  # noqa: E402
from _utility_references import reference_images, sample_nonprivate, train_nonprivate_lora, vae_reconstructions  # noqa: E402
from _utility_scoring import Evaluator, resolve_device, score_runs  # noqa: E402

from dpdiff.config import load_config  # noqa: E402
from dpdiff.data.transforms import images_to_tensor  # noqa: E402
from dpdiff.errors import ConfigError, DPDiffError, PrivacyError  # noqa: E402
from dpdiff.features import EFFICIENTNET_LITE0_DEFAULT_LAYERS, EFFICIENTNET_LITE0_LEGACY_DEFAULT_LAYERS, check_layers  # noqa: E402
from dpdiff.io import write_json  # noqa: E402
from dpdiff.mepf.train import LR_SCHEDULES  # noqa: E402
from dpdiff.privacy.diffusion_loss import timestep_weights  # noqa: E402
from dpdiff.training.arguments import DEFAULT_MAX_GRAD_NORM  # noqa: E402

# the benchmark's LoRA is the shipped recipe's (every layer kind); the library's attention-only default scores ~10
# points lower here (`### Utility levers` (under `## History`)), and a command that forgot the flag once produced a misleading row
RECIPE_LORA_TARGETS = load_config(ROOT / "recipes" / "configs" / "finetune_lora.yaml")["lora_target_modules"]
TRAINED_FILE = "benchmark_trained.json"
STARTED_FILE = "benchmark_started.json"  # an unfinished DP-SGD or DP-MEPF training with these settings: resumable
# the defaults are the complete benchmark; changing one of these makes the run "reduced"
FULL_SCALE = {"max_train_samples": None, "epochs": 10.0, "max_steps": None, "num_per_class": 6000, "eval_epochs": None,
              "test_limit": None, "num_fd_samples": 2000, "mepf_generator_steps": 7000, "inference_steps": 50}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--methods", nargs="*", default=list(METHODS), help=f"from {', '.join(METHODS)} (none: only the references)")
    a("--epsilons", nargs="+", type=float, default=[1.0, 10.0])
    a("--references", nargs="*", default=list(REFERENCES), help=f"from {', '.join(REFERENCES)} (none: skip)")
    a("--delta", type=float, default=1e-5)
    a("--base_model", default="dpdiff-tiny", help="the public pretrained pipeline (hub id, folder, dpdiff-tiny)")
    a("--max_train_samples", type=int, default=None, help="seeded subset of the 60k private images (all methods)")
    a("--epochs", type=float, default=FULL_SCALE["epochs"], help="DP-SGD passes over the private set")
    a("--max_steps", type=int, default=None, help="DP-SGD steps instead of --epochs (smoke tests)")
    a("--batch_size", type=int, default=256)
    a("--physical_batch_size", type=int, default=64)
    a("--learning_rate", type=float, default=None, help="DP-SGD learning rate of every diffusion method (default: the method's)")
    a("--max_grad_norm", type=float, default=DEFAULT_MAX_GRAD_NORM, help="per-example clipping norm C of every diffusion method")
    a("--noise_multiplicity", type=int, default=1, help="K (noise, timestep) draws averaged inside each example's "
      "gradient before clipping (DP-SGD methods; K times the compute per step, no privacy cost)")
    a("--timestep_bias_strategy", choices=("none", "earlier", "later"), default="none",
      help="DP-SGD methods and the non-private reference: draw the first (earlier) or last (later, noisiest) --timestep_bias_portion of the "
      "timesteps --timestep_bias_multiplier times as often (the diffusers flags)")
    a("--timestep_bias_multiplier", type=float, default=1.0)
    a("--timestep_bias_portion", type=float, default=0.25)
    a("--prompt_template", default=None, help="caption template of the diffusion methods ({class_name}, {article}, {label})")
    a("--rank", type=int, default=8, help="LoRA rank (lora and nonprivate_lora)")
    a("--lora_target_modules", nargs="+", default=list(RECIPE_LORA_TARGETS), help="LoRA targets (lora and nonprivate_lora; "
      "default: recipes/configs/finetune_lora.yaml's)")
    a("--attention_start_index", type=int, default=0, help="attention (DP-LDM): train the attention blocks from this "
      "depth index on (0: all of them)")
    a("--mepf_generator_steps", type=int, default=FULL_SCALE["mepf_generator_steps"])
    a("--mepf_base_channels", type=int, default=64, help="DP-MEPF generator width (its --base_channels)")
    a("--mepf_feature_input_size", type=int, default=32, help="side DP-MEPF's feature extractor sees (its --feature_input_size)")
    a("--mepf_lr_schedule", choices=LR_SCHEDULES, default="step", help="DP-MEPF generator's --lr_schedule")
    a("--mepf_feature_layers", nargs="+", default=list(EFFICIENTNET_LITE0_DEFAULT_LAYERS), help="DP-MEPF extractor "
      "layers matched (its --feature_layers)")
    a("--mepf_batch_size", type=int, default=50, help="DP-MEPF generator batch (its --batch_size)")
    a("--mepf_pixel_features", action=argparse.BooleanOptionalAction, default=True, help="DP-MEPF embedding with the "
      "image's grey levels as one more block (its --pixel_features; rows before 2026-12-06 ran without it)")
    a("--mepf_num_generators", type=int, default=1, help="DP-MEPF generators trained on the one release, the best kept "
      "(its --num_generators: N times the generator time, no privacy cost)")
    a("--num_per_class", type=int, default=FULL_SCALE["num_per_class"], help="synthetic images per class")
    a("--inference_steps", type=int, default=FULL_SCALE["inference_steps"], help="DDIM steps when sampling")
    a("--guidance_scale", type=float, default=2.0)
    a("--eval_epochs", type=int, default=None, help="epochs of every classifier (default: cnn 10, logreg 20, mlp 20)")
    a("--eval_repeats", type=int, default=1, help="train each classifier from this many seeds and report the mean "
      "(± std in the table); repeat 0 is the single run's seed")
    a("--test_limit", type=int, default=None, help="seeded subset of the 10k real test images")
    a("--num_fd_samples", type=int, default=FULL_SCALE["num_fd_samples"], help="images per side for FD")
    a("--fd_input_size", type=int, default=224)
    a("--output_dir", default="outputs/utility-bench", help="runs, synthetic sets and results.json")
    a("--docs_dir", default=str(ROOT / "docs"), help="where the plots go")
    a("--benchmarks_md", default=str(BENCHMARKS_MD), help="markdown file whose `## Utility` section is replaced")
    a("--report_from", nargs="+", default=None, help="only write the docs section from these results.json files (no runs); "
      "docs/utility_results.json holds what the section shows now: pass it with new results to add rows")
    a("--score_runs", nargs="+", default=None, help="score these finished dpdiff runs (finetune or tune output folders) "
      "with this protocol instead of training: --num_per_class, --inference_steps, --guidance_scale; rows -> "
      "OUTPUT_DIR/scored_runs.json")
    a("--score_section", default=None, help="with --score_runs: also write their table as this `## section` of --benchmarks_md")
    a("--skip_existing", action="store_true", help="keep finished runs of results.json that used the same settings, "
      "resume interrupted DP-SGD trainings from their latest checkpoint")
    a("--checkpointing_steps", type=int, default=0, help="DP-SGD checkpoint every N steps (0: never): a schedule longer "
      "than one sitting continues with --skip_existing; the privacy ledger continues, never reset")
    a("--smoke", action="store_true", help="label every number as from a smoke run (tests)")
    a("--device", default="auto")
    a("--seed", type=int, default=0)
    return p


def check(args) -> None:
    """Every refusal before any work."""
    bad = [m for m in args.methods if m not in METHODS] + [r for r in args.references if r not in REFERENCES]
    if bad:
        raise ConfigError(f"unknown methods/references {bad} (methods: {list(METHODS)}, references: {list(REFERENCES)})")
    if not (args.methods or args.references):
        raise ConfigError(f"nothing to run: give --methods (from {list(METHODS)}) or --references (from {list(REFERENCES)})")
    if any(not (e > 0 and e < float("inf")) for e in args.epsilons) or (args.methods and not args.epsilons):
        raise ConfigError(f"--epsilons must be finite positive numbers, got {args.epsilons}")
    for name in ("num_per_class", "batch_size", "physical_batch_size", "mepf_generator_steps", "inference_steps", "fd_input_size",
                 "noise_multiplicity", "eval_repeats", "mepf_base_channels", "mepf_feature_input_size", "mepf_batch_size",
                 "mepf_num_generators"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        check_layers("efficientnet_lite0", args.mepf_feature_layers)
    except ConfigError as err:
        raise ConfigError(f"--mepf_feature_layers: {err}") from None
    try:
        timestep_weights(1000, args.timestep_bias_strategy, args.timestep_bias_multiplier, args.timestep_bias_portion)
    except ValueError as err:
        raise ConfigError(f"--{err}") from None
    if args.checkpointing_steps < 0:
        raise ConfigError(f"--checkpointing_steps must be >= 0 (0: no checkpoints), got {args.checkpointing_steps}")
    if args.attention_start_index < 0:
        raise ConfigError(f"--attention_start_index must be >= 0 (0: every attention block), got {args.attention_start_index}")
    for name in ("max_train_samples", "test_limit", "eval_epochs", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    n = args.max_train_samples or 60000
    if args.batch_size > n:
        raise ConfigError(f"--batch_size {args.batch_size} must be <= the {n} private images")
    if not 0 < args.delta < 1 / n:
        raise PrivacyError(f"--delta {args.delta} must be in (0, 1/n) = (0, {1 / n:.3g}) for n = {n} private images")
    available = min(args.num_per_class * 10, n, args.test_limit or 10000)  # synthetic, real train, real test
    if not 2 <= args.num_fd_samples <= available:
        raise ConfigError(f"--num_fd_samples {args.num_fd_samples} must be in [2, {available}]: the images every side "
                          "has (10 x --num_per_class synthetic, the real train and test sets); FD compares equal counts")


def run_kind(args) -> str:
    if args.smoke:
        return "smoke"
    return "reduced" if any(getattr(args, k) != v for k, v in FULL_SCALE.items()) else "full"


@contextlib.contextmanager
def phase(timings: dict, name: str):
    """CPU seconds of this process (all threads) and wall seconds of one phase."""
    cpu, wall = time.process_time(), time.perf_counter()
    yield
    timings[name] = {"cpu_s": round(time.process_time() - cpu, 2), "wall_s": round(time.perf_counter() - wall, 2)}


def train_dp_sgd(args, method: str, epsilon: float, out: Path, resume: bool = False) -> dict:
    from dpdiff.training.arguments import finetune_args
    from dpdiff.training.loop import finetune

    flags = {"method": method, "pretrained_model_name_or_path": args.base_model, "dataset": DATASET,
             "target_epsilon": epsilon, "delta": args.delta, "batch_size": args.batch_size,
             "physical_batch_size": args.physical_batch_size, "output_dir": out,
             "num_inference_steps": args.inference_steps, "guidance_scale": args.guidance_scale, "seed": args.seed,
             "max_train_samples": args.max_train_samples, "max_steps": args.max_steps,
             "epochs": None if args.max_steps else args.epochs, "learning_rate": args.learning_rate,
             "max_grad_norm": args.max_grad_norm, "noise_multiplicity": args.noise_multiplicity,
             **{k: getattr(args, k) for k in TIMESTEP_BIAS_FLAGS}, "prompt_template": args.prompt_template, "rank": args.rank,
             "lora_target_modules": args.lora_target_modules, "attention_start_index": args.attention_start_index,
             "checkpointing_steps": args.checkpointing_steps,
             "resume_from_checkpoint": "latest" if resume else None}
    return finetune(finetune_args(**flags, overwrite_output_dir=True)).record


def train_mepf(args, epsilon: float, out: Path, resume: bool = False) -> dict:
    from dpdiff.mepf import cli as mepf_cli

    parser = argparse.ArgumentParser()
    mepf_cli.add_arguments(parser)
    flags = ["--dataset", DATASET, "--target_epsilon", str(epsilon), "--delta", str(args.delta), "--output_dir", str(out),
             "--generator_steps", str(args.mepf_generator_steps), "--moments", "2",
             "--feature_input_size", str(args.mepf_feature_input_size), "--base_channels", str(args.mepf_base_channels),
             "--lr_schedule", args.mepf_lr_schedule, "--batch_size", str(args.mepf_batch_size), "--seed", str(args.seed), "--no-progress",
             "--eval_every", str(max(1, args.mepf_generator_steps // 10)), "--eval_samples_per_class", "100",
             "--num_generators", str(args.mepf_num_generators)]
    if args.max_train_samples:
        flags += ["--limit", str(args.max_train_samples)]
    flags += ["--feature_layers", *args.mepf_feature_layers]
    flags.append("--pixel_features" if args.mepf_pixel_features else "--no-pixel_features")
    if resume:  # the release of the interrupted run is reused (no second privacy cost), its generator continues
        flags.append("--resume")
    ns = parser.parse_args(flags)
    mepf_cli.train_mepf(ns, mepf_cli.validate(ns))
    return json.loads((out / "privacy.json").read_text())


def run_one(args, key: str, method: str, epsilon: float | None, evaluate: Evaluator, out: Path) -> dict:
    run_dir, synthetic = out / "runs" / key, out / "synthetic" / key
    marker = run_dir / TRAINED_FILE  # a finished training: --skip_existing samples and scores it again, no retraining
    trained = json.loads(marker.read_text()) if args.skip_existing and marker.is_file() else None
    if trained is not None and (trained["settings"], trained["method"]) != (settings(args), method):
        trained = None
    started, run_id = run_dir / STARTED_FILE, {"settings": settings(args), "method": method}
    resume_at = _resumable_step(started, run_id, method) if args.skip_existing and not trained else None
    for folder in (synthetic,) if trained or resume_at is not None else (run_dir, synthetic):
        shutil.rmtree(folder, ignore_errors=True)  # a rerun starts clean: no stale release or samples
    timings: dict = {}
    entry = {"method": method, "target_epsilon": epsilon, "run_kind": run_kind(args), "settings": settings(args)}
    if method == "real":
        with phase(timings, "evaluate"):
            train = reference_images(args)
            x, y = images_to_tensor(train["image"], RESOLUTION, CHANNELS), torch.tensor(train["label"])
            entry.update(evaluate(x, y), private=False, guarantee=None)
    elif method == "vae_reconstruction":
        with phase(timings, "evaluate"):
            entry.update(evaluate(*vae_reconstructions(args)), private=False, guarantee=None)
    elif method == "nonprivate_lora":
        run_dir.mkdir(parents=True)
        with phase(timings, "train"):
            pipe, source = train_nonprivate_lora(args, run_dir)
        with phase(timings, "sample"):
            sample_nonprivate(args, pipe, source, synthetic)
        with phase(timings, "evaluate"):
            entry.update(evaluate(*load_images(synthetic, evaluate.class_names)), private=False, guarantee=None)
    else:
        from dpdiff.sampling import sample_dataset

        if trained:
            record, timings["train"] = trained["record"], trained["train_timing"]
        else:
            if resume_at is None:
                write_json(started, run_id)
            resume = resume_at is not None
            with phase(timings, "train"):
                record = (train_mepf(args, epsilon, run_dir, resume) if method == "mepf"
                          else train_dp_sgd(args, method, epsilon, run_dir, resume))
            if resume:  # this process timed only the steps after the checkpoint
                timings["train"]["resumed_at_step"] = resume_at
            write_json(marker, {"settings": settings(args), "method": method, "record": record, "train_timing": timings["train"]})
        with phase(timings, "sample"):
            sample_dataset(run_dir, synthetic, num_per_class=args.num_per_class, seed=args.seed, resolution=RESOLUTION,
                           guidance_scale=args.guidance_scale, num_inference_steps=args.inference_steps,
                           batch_size=50, device=resolve_device(args))
        with phase(timings, "evaluate"):
            entry.update(evaluate(*load_images(synthetic, evaluate.class_names)), private=True)
        entry["guarantee"] = {k: record.get(k) for k in ("epsilon", "delta", "accountant", "noise_multiplier", "steps",
                                                         "sample_rate", "num_examples", "neighbouring_relation")}
    entry.update(timings=timings, synthetic_dir=str(synthetic) if method not in IMAGE_REFERENCES else None)
    return entry


def _resumable_step(started: Path, run_id: dict, method: str) -> int | None:
    """The step an interrupted training with these settings continues from, else None (start over). DP-SGD: its
    latest checkpoint (ledger included). DP-MEPF: once its embedding is released, the release is reused (never
    released twice) and the generator continues from its checkpoint, or from step 0 when it has none yet."""
    from dpdiff.mepf.release import RELEASE_FILE
    from dpdiff.mepf.restarts import CANDIDATES_DIR
    from dpdiff.mepf.train import CHECKPOINT_DIR
    from dpdiff.training.checkpoint import checkpoint_step, list_checkpoints

    if not started.is_file() or json.loads(started.read_text()) != json.loads(json.dumps(run_id)):
        return None
    run_dir = started.parent
    if method == "mepf":
        if not (run_dir / RELEASE_FILE).is_file():
            return None
        states = [run_dir / CHECKPOINT_DIR, *sorted((run_dir / CANDIDATES_DIR).glob(f"*/{CHECKPOINT_DIR}"))]
        return sum(int(json.loads((s / "trainer_state.json").read_text())["step"]) for s in states if (s / "trainer_state.json").is_file())
    if method not in DP_SGD_METHODS:
        return None
    found = list_checkpoints(run_dir)
    return checkpoint_step(found[-1]) if found else None


# flags added after results files were written: left out of `settings` at these values, so older runs still match
LATER_FLAG_DEFAULTS = {"noise_multiplicity": 1, "eval_repeats": 1, "timestep_bias_strategy": "none", "timestep_bias_multiplier": 1.0,
                       "timestep_bias_portion": 0.25, "attention_start_index": 0, "mepf_base_channels": 32,
                       "mepf_feature_input_size": 32, "mepf_lr_schedule": "constant",
                       "mepf_feature_layers": list(EFFICIENTNET_LITE0_LEGACY_DEFAULT_LAYERS),
                       "mepf_batch_size": 50, "mepf_num_generators": 1,
                       "mepf_pixel_features": False}
TIMESTEP_BIAS_FLAGS = ("timestep_bias_strategy", "timestep_bias_multiplier", "timestep_bias_portion")


def settings(args) -> dict:
    """What must match for --skip_existing to reuse a finished run (all but what to run, where and how often to save)."""
    where = ("methods", "epsilons", "references", "output_dir", "docs_dir", "benchmarks_md", "skip_existing", "device",
             "report_from", "checkpointing_steps")
    return {k: v for k, v in vars(args).items()
            if k not in where and not (k in LATER_FLAG_DEFAULTS and v == LATER_FLAG_DEFAULTS[k])}


def jobs(args) -> list[tuple[str, str, float | None]]:
    out = [(f"{m}_eps{e:g}", m, e) for m in args.methods for e in args.epsilons]
    return out + [(r, r, None) for r in args.references]


def in_report_order(runs: dict) -> dict:
    """Methods, then references, each by epsilon: a fixed order whatever order the runs finished in."""
    order = [*METHODS, *REFERENCES]
    return dict(sorted(runs.items(), key=lambda kv: (order.index(kv[1]["method"]), kv[1]["target_epsilon"] or 0)))


def merge_runs(parts: list[dict]) -> dict:
    """The runs of several results files in one dict. Runs of the same name with different settings (e.g.
    lora_eps10 on the shipped preset and on a wider one) are both kept, the later as NAME_2, ...; the same run twice
    is an error (it would be counted twice)."""
    runs: dict = {}
    for part in parts:
        for key, run in part.items():
            name = run.get("name", key)  # a merged file (docs/utility_results.json) merges again to the same keys
            same = [k for k in runs if runs[k]["name"] == name]
            if any(runs[k]["settings"] == run["settings"] for k in same):
                raise ConfigError(f"--report_from: run {name!r} with the same settings is in more than one results file")
            runs[f"{name}_{len(same) + 1}" if same else name] = {**run, "name": name}
    return in_report_order(runs)


def merge_reports(paths: list[Path], docs_dir: Path, md_path: Path) -> dict:
    """One docs section from the results.json of several invocations (e.g. runs done in parallel)."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"--report_from: no such results file {missing}")
    parts = [json.loads(p.read_text()) for p in paths]
    runs = merge_runs([part["runs"] for part in parts])
    kinds = {p["run_kind"] for p in parts}
    merged = {**parts[0], "run_kind": next(k for k in ("smoke", "reduced", "full") if k in kinds),
              "commands": [c for p in parts for c in p["commands"]], "runs": runs}
    render_docs(merged, docs_dir, md_path)
    return merged


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results dict (also written to OUTPUT_DIR/results.json)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.report_from:
        return merge_reports([Path(p) for p in args.report_from], Path(args.docs_dir), Path(args.benchmarks_md))
    if args.score_runs:
        missing = [d for d in args.score_runs if not (Path(d) / "privacy.json").is_file()]
        if missing:
            raise ConfigError(f"--score_runs: {missing} hold no privacy.json (not a finished dpdiff run)")
        return score_runs(args, Evaluator(args))
    check(args)
    out = Path(args.output_dir)
    results_path = out / "results.json"
    old = json.loads(results_path.read_text()) if args.skip_existing and results_path.exists() else {}
    runs = {k: v for k, v in old.get("runs", {}).items() if v.get("settings") == settings(args)}
    commands = (old.get("commands", []) if runs else []) + ["python benchmarks/utility.py " + shlex.join(argv)]
    evaluate = Evaluator(args)
    results = {"run_kind": run_kind(args), "commands": commands, "dataset": DATASET, "published": PUBLISHED,
               "class_names": evaluate.class_names, "runs": runs}
    for key, method, epsilon in jobs(args):
        if key in runs:
            print(f"[utility] {key}: kept from {results_path}")
            continue
        print(f"[utility] {key}: running")
        runs[key] = run_one(args, key, method, epsilon, evaluate, out)
        write_json(results_path, results)  # after every run, so --skip_existing can resume
    # runs kept from earlier invocations with the same settings stay in the report, in a fixed order
    results["runs"] = in_report_order(runs)
    write_json(results_path, results)
    render_docs(results, Path(args.docs_dir), Path(args.benchmarks_md))
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        main()
    except DPDiffError as e:
        sys.exit(f"benchmarks/utility.py: error: {e}")
