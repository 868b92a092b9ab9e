"""Sampling synthetic datasets from a DP fine-tuned run (`dpdiff sample`, recipes/sample.py).

The heavy parts (diffusers, datasets) load on first use, so `dpdiff sample --help` is quick."""

from __future__ import annotations

import argparse
import importlib

from dpdiff.config import add_config_argument, run_command
from dpdiff.errors import ConfigError, DPDiffError

DTYPES = ("float32", "float16", "bfloat16")
# `--scheduler` names -> diffusers class names (strings: the CLI needs no diffusers import); each is built
# from the base pipeline's noise-schedule config in dpdiff.sampling.pipeline
SCHEDULERS = {
    "ddim": "DDIMScheduler",  # deterministic, the default
    "ddpm": "DDPMScheduler",  # ancestral: fresh noise at every step
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",  # DPM-Solver++(2M): good images in 10-20 steps
    "unipc": "UniPCMultistepScheduler",
}
SCHEDULER_NAMES = tuple(SCHEDULERS)
_LAZY = {
    "load_finetuned_pipeline": "dpdiff.sampling.pipeline",
    "sample_dataset": "dpdiff.sampling.generate",
    "plan_requests": "dpdiff.sampling.generate",
    "image_seed": "dpdiff.sampling.generate",
    "read_run": "dpdiff.sampling.records",
    "resolve_run": "dpdiff.sampling.records",
    "RunRecord": "dpdiff.sampling.records",
}


def check_scheduler(name: str) -> None:
    """Refuse an unknown `--scheduler` before any model is loaded."""
    if name not in SCHEDULER_NAMES:
        raise ConfigError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULER_NAMES)}")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dpdiff sample`; the same names are the keys of recipes/configs/sample.yaml."""
    parser.add_argument("--model_dir", help="output folder of a fine-tuning (or MEPF) run, or its hub id")
    parser.add_argument("--base_model", default=None, help="override the base pipeline recorded in the run (hub id, folder, dpdiff-tiny)")
    parser.add_argument("--output_dir", help="folder for the synthetic dataset (must be empty unless --overwrite)")
    parser.add_argument("--num_per_class", type=int, default=None, help="images per class of the run's data")
    parser.add_argument("--prompt", action="append", default=None, help="free prompt (repeatable); label = its position")
    parser.add_argument("--num_per_prompt", type=int, default=1, help="images per --prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the run's generation_config.json")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="sampler steps; default: the run's generation_config.json")
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="ddim",
                        help="the sampler (diffusers scheduler): ddim (deterministic), ddpm / euler_ancestral (fresh noise "
                             "each step), euler, dpm_solver (DPM-Solver++ 2M), unipc")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--format", choices=["imagefolder", "datasets"], default="imagefolder")
    parser.add_argument("--resolution", type=int, default=None, help="resize the samples (e.g. 28 for Fashion-MNIST evaluation)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="float16/bfloat16 for speed on a GPU")
    add_config_argument(parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    return run_command("sample", args, parser, add_arguments, _sample)


def _sample(args: argparse.Namespace) -> int:
    if not args.model_dir or not args.output_dir:
        raise DPDiffError("--model_dir and --output_dir are required (on the command line or in --config)")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    from dpdiff.sampling.generate import sample_dataset

    out = sample_dataset(
        args.model_dir,
        args.output_dir,
        num_per_class=args.num_per_class,
        prompts=args.prompt,
        num_per_prompt=args.num_per_prompt,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        batch_size=args.batch_size,
        format=args.format,
        resolution=args.resolution,
        overwrite=args.overwrite,
        base_model=args.base_model,
        device=device,
        torch_dtype=getattr(torch, args.dtype),
        scheduler=args.scheduler,
    )
    print(f"wrote {out} ({args.format}); see {out}/sampling.json for counts and the privacy guarantee")
    return 0


__all__ = ["add_arguments", "check_scheduler", "run", *_LAZY]
