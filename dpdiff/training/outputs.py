"""The output folder of a run: checked before any work, and the records written at the end.

`privacy.json` is the guarantee (what the model card and the sampler read); `generation_config.json`
says how to sample; `training_config.yaml` holds the run's flags, so `--config` of it trains again the
same way. All are written atomically."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from dpdiff.errors import ConfigError
from dpdiff.io import write_json, write_text
from dpdiff.run_files import TRAINING_CONFIG

NEIGHBOURING_RELATION = (
    "add/remove one example (one training image with its label/caption); "
    "Poisson subsampling with rate sample_rate at every step"
)
MIN_FREE_BYTES = 200 * 2**20  # weights + checkpoints of a small adapter, with room to spare


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool, resuming: bool) -> Path:
    """Refuse a non-empty folder (unless overwriting or resuming), an unwritable one or a full disk.

    Fails here, in the first second, rather than after an hour of training."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise ConfigError(
            f"--output_dir {path} is not empty; pass --overwrite_output_dir to replace its results, "
            "or --resume_from_checkpoint latest to continue its run"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"--output_dir {path} is not writable ({e.strerror}); choose another folder") from e
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"only {free / 2**20:.0f} MiB free under {path}; dpdiff needs at least {MIN_FREE_BYTES / 2**20:.0f} MiB")
    if overwrite and not resuming:
        for name in ("privacy.json", "generation_config.json", TRAINING_CONFIG, "README.md", "pytorch_lora_weights.safetensors", "unet", "transformer", "checkpoints"):
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return path


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("dpdiff", "opacus", "torch", "diffusers", "peft", "accelerate"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def privacy_record(args, plan, ledger, engine, summary, num_examples: int) -> dict:
    """Every number a reader needs to check the guarantee; epsilon is the ledger's (steps actually taken)."""
    return {
        "epsilon": ledger.epsilon(),
        "target_epsilon": plan.target_epsilon,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "max_grad_norm": args.max_grad_norm,
        "clipping": args.clipping,
        "sample_rate": plan.sample_rate,
        "steps": ledger.steps,
        "planned_steps": plan.steps,
        "noise_multiplicity": args.noise_multiplicity,
        "batch_size": args.batch_size,
        "num_examples": num_examples,
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "unit_of_privacy": "one training image together with its label/caption",
        "method": args.method,
        "family": engine.family.name,
        "objective": engine.objective.describe(),
        "trainable_parameters": summary.trainable_params,
        "total_parameters": summary.total_params,
        **({"lora_rank": summary.lora_config["r"], "lora_target_modules": sorted(summary.lora_config["target_modules"])}
           if summary.lora_config else {}),
        "base_model": args.pretrained_model_name_or_path,
        "dataset": args.dataset + (f" (seeded subset of {num_examples})" if args.max_train_samples else ""),
        "world_size": engine.world_size,
        "grad_sample_mode": engine.grad_sample_mode,
        "precision": engine.precision,
        "secure_mode": bool(args.secure_mode),
        "privacy_seed": args.privacy_seed,
        "noise_source": "OS entropy" if args.privacy_seed is None else "fixed seed (NOT private: tests only)",
        "ledger": ledger.to_dict(),
        "force_delta": bool(args.force_delta),
        "versions": library_versions(),
    }


def generation_config(args, source, resolution: int, channels: int, family=None) -> dict:
    """How to sample. Prompts are public text only: --validation_prompt, the class prompts, or (a captions-only
    set, whose captions are private) the first validation prompt or the empty prompt, never a caption."""
    from dpdiff.training.diffusers_run import captions_only, public_prompts

    validation = getattr(args, "validation_prompt", None)
    vae = getattr(args, "pretrained_vae_model_name_or_path", None)
    return {
        "base_model": args.pretrained_model_name_or_path,
        **({"vae": vae} if vae else {}),
        "method": args.method,
        **({"family": family.name} if family is not None else {}),
        "class_names": list(source.class_names),
        "class_prompts": public_prompts(source, args)[:1] if captions_only(source) else list(source.class_prompts),
        **({"validation_prompts": list(validation)} if validation else {}),
        "resolution": resolution,
        "channels": channels,
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.num_inference_steps,
    }


def write_records(output_dir: Path, privacy: dict, generation: dict, training: dict) -> None:
    write_json(output_dir / "privacy.json", privacy)
    write_json(output_dir / "generation_config.json", generation)
    header = "# the flags of this run: `--config` this file trains again the same way (fresh DP noise unless privacy_seed is set)\n"
    write_text(output_dir / TRAINING_CONFIG, header + yaml.safe_dump(training, sort_keys=True))
