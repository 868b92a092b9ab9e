"""Is the EMA a lever? Score the latest checkpoint of a finished `benchmarks/utility.py` DP LoRA run twice
with the `## Utility` protocol: its raw DP-SGD iterate and the EMA of the iterates (what a release holds).
Both are post-processing of the same DP-SGD run: the same guarantee. Same sampling seeds for both, so
the difference is the weights, not the draw.

    python benchmarks/ema_lever.py --benchmark_dir outputs/u-e10-b512 --key lora_eps10

Writes `<benchmark_dir>/ema_lever-<key>.json` and prints both scores."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # a dependency ships a top-level `benchmarks` package

from _utility_report import RESOLUTION, load_images  # noqa: E402
from _utility_scoring import Evaluator  # noqa: E402
from utility import LATER_FLAG_DEFAULTS, STARTED_FILE  # noqa: E402  (the run's settings, as utility.py recorded them)

from dpdiff.errors import ConfigError  # noqa: E402
from dpdiff.io import atomic_dir, write_json  # noqa: E402


def checkpoint_releases(run_dir: Path, settings: dict, targets: dict[str, Path]) -> int:
    """Copies of the release whose LoRA weights are the latest checkpoint's raw iterate (targets["raw"]) and
    its EMA (targets["ema"]), each written atomically; returns the checkpoint's step. Both are checked
    before anything is written. (No checkpoint is written at the final step: the release is.)"""
    import torch

    from dpdiff.adapters import prepare_trainable, save_trained
    from dpdiff.pipelines import load_pipeline
    from dpdiff.training.checkpoint import checkpoint_step, list_checkpoints, load_checkpoint

    found = list_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"{run_dir} has no checkpoint: run utility.py with --checkpointing_steps")
    trainable, state, _ = load_checkpoint(found[-1])
    if not state.get("ema"):
        raise ConfigError(f"{found[-1]} holds no EMA: the run trained with --ema_decay 0")
    pipe = load_pipeline(settings["base_model"])
    prepare_trainable(pipe.unet.train(), "lora", rank=settings["rank"], target_modules=settings["lora_target_modules"])
    named = [(n, p) for n, p in pipe.unet.named_parameters() if p.requires_grad]  # the EMA's parameter order
    values = {"raw": [trainable.get(n) for n, _ in named], "ema": state["ema"]["shadow_params"]}
    for weights, tensors in values.items():
        if len(tensors) != len(named) or any(v is None or v.shape != p.shape for v, (_, p) in zip(tensors, named)):
            raise ConfigError(f"{found[-1]} does not hold the {weights} weights of this run's LoRA settings")
    for weights, target in targets.items():
        with torch.no_grad():
            for value, (_, param) in zip(values[weights], named):
                param.copy_(value)
        with atomic_dir(target) as tmp:
            for f in run_dir.iterdir():  # the privacy record of the whole run (conservative for an earlier step)
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            save_trained(pipe.unet, tmp, "lora")  # replaces the released weights copied above
    return checkpoint_step(found[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark_dir", required=True, help="a utility.py --output_dir")
    p.add_argument("--key", required=True, help="the run's key in results.json, e.g. lora_eps10")
    args = p.parse_args(argv)
    out = Path(args.benchmark_dir)
    results = json.loads((out / "results.json").read_text())
    if args.key not in results["runs"]:
        raise ConfigError(f"{out / 'results.json'} has no run {args.key!r}: {sorted(results['runs'])}")
    released = results["runs"][args.key]
    settings = json.loads((out / "runs" / args.key / STARTED_FILE).read_text())["settings"]
    if released["method"] != "lora":
        raise ConfigError(f"{args.key} is a {released['method']} run; this script compares LoRA weights")

    from dpdiff.sampling import sample_dataset

    # settings left out at their defaults (flags newer than the run's file) come back at those defaults
    evaluate = Evaluator(argparse.Namespace(**{**LATER_FLAG_DEFAULTS, **settings, "device": "cpu", "output_dir": str(out)}))
    report = {"run": args.key, "final_step": released["guarantee"]["steps"],
              "released": {"accuracy": released["accuracy"], "fd": released["fd"]["value"]}}
    folders = {weights: out / "runs" / f"{args.key}-{weights}" for weights in ("raw", "ema")}
    report["step"] = checkpoint_releases(out / "runs" / args.key, settings, folders)
    for weights, folder in folders.items():
        synthetic = out / "synthetic" / f"{args.key}-{weights}"
        start = time.process_time()
        shutil.rmtree(synthetic, ignore_errors=True)
        sample_dataset(folder, synthetic, num_per_class=settings["num_per_class"], seed=settings["seed"],
                       resolution=RESOLUTION, guidance_scale=settings["guidance_scale"],
                       num_inference_steps=settings["inference_steps"], batch_size=50)
        sample_cpu_s = round(time.process_time() - start, 1)
        scores = evaluate(*load_images(synthetic, evaluate.class_names))
        report[weights] = {"accuracy": scores["accuracy"], "fd": scores["fd"]["value"], "sample_cpu_s": sample_cpu_s}
    write_json(out / f"ema_lever-{args.key}.json", report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
