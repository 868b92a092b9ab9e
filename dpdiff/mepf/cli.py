"""`dpdiff mepf` (and recipes/train_mepf.py): release a DP embedding of the private data, then train
a generator on it.

The output folder gets: privacy.json (the guarantee), release.safetensors (the noisy embedding:
retrain the generator from it with --resume or another --output_dir... without touching the data),
generator/ (best generator), checkpoint/ (latest state), generation_config.json (for `dpdiff sample`),
mepf_config.json (every flag), samples.png; with --num_generators N, candidates/seed<k>/ holds each
generator's own generator/ and checkpoint/ and generator/ is the best of them.

A release spends privacy budget. A folder that already holds one is reused only with --resume; a
second run into it without --resume is refused rather than silently releasing again.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from dpdiff.config import add_config_argument, run_command
from dpdiff.errors import ConfigError, PrivacyError
from dpdiff.features import AVAILABLE_EXTRACTORS, check_extractor_available, check_layers
from dpdiff.imaging import save_grid
from dpdiff.io import write_json
from dpdiff.mepf.calibration import noise_multiplier_for_releases
from dpdiff.mepf.embedding import CHANNEL_STATS, EmbeddingConfig, build_extractor
from dpdiff.mepf.generator import ConditionalGenerator, GeneratorConfig, upsampling_plan
from dpdiff.mepf.release import RELEASE_FILE, load_release, planned_releases, release_embedding, save_release
from dpdiff.mepf.restarts import train_best_of
from dpdiff.mepf.sample import sample_mepf
from dpdiff.mepf.train import LR_SCHEDULES, TrainConfig, train_generator
from dpdiff.privacy.accounting import DEFAULT_DELTA

GENERATION_FILE = "generation_config.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("private data")
    data.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist | mnist5k | animal_mnist | imagefolder:PATH | hub id")
    data.add_argument("--split", default="train")
    data.add_argument("--limit", type=int, default=None, help="use a seeded random subset of this many examples (privacy is then about that subset)")
    data.add_argument("--resolution", type=int, default=None, help="image side (default: the dataset's own, e.g. 28)")
    data.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: 1 for grey datasets, else 3")
    priv = parser.add_argument_group("privacy")
    priv.add_argument("--target_epsilon", type=float, default=10.0)
    priv.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="must be < 1/n")
    priv.add_argument("--force_delta", action="store_true", help="allow delta >= 1/n (weak guarantee; not recommended)")
    priv.add_argument("--max_grad_norm", type=float, default=1.0, help="C: each example's feature vector has norm <= C")
    priv.add_argument("--moments", type=int, choices=(1, 2), default=1, help="1: mean embedding; 2: also the second moment")
    priv.add_argument("--labelled", action=argparse.BooleanOptionalAction, default=True, help="one embedding per class (noisy class counts)")
    priv.add_argument("--validation_fraction", type=float, default=0.0, help="held-out share with its own noisy embedding, for checkpoint selection (in the budget)")
    feat = parser.add_argument_group("features")
    feat.add_argument("--feature_extractor", choices=AVAILABLE_EXTRACTORS, default="efficientnet_lite0")
    feat.add_argument("--feature_layers", nargs="*", default=None, help="hooked layers (default: the extractor's stage outputs)")
    feat.add_argument("--feature_input_size", type=int, default=64, help="side the extractor sees (224 = ImageNet; smaller is faster)")
    feat.add_argument("--channel_stats", choices=CHANNEL_STATS, default="mean_var")
    feat.add_argument("--pooled_features", action=argparse.BooleanOptionalAction, default=True)
    feat.add_argument("--pixel_features", action=argparse.BooleanOptionalAction, default=True,
                      help="add the image's grey levels as one more block (its class mean picture and pixel variance); "
                           "--no-pixel_features: the extractor's blocks only (the default before 2026-12-06)")
    feat.add_argument("--embed_batch_size", type=int, default=128)
    gen = parser.add_argument_group("generator")
    gen.add_argument("--generator_steps", type=int, default=2000)
    gen.add_argument("--batch_size", type=int, default=100)
    gen.add_argument("--learning_rate", type=float, default=1e-3)
    gen.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="constant",
                     help="cosine: decay from --learning_rate to 0 over --generator_steps; step: multiply it by "
                          "--lr_decay_factor after --lr_decay_at of the steps (both continued by --resume)")
    gen.add_argument("--lr_decay_at", type=float, default=0.7, help="step schedule: fraction of --generator_steps before the decay")
    gen.add_argument("--lr_decay_factor", type=float, default=0.2, help="step schedule: the rate after the decay, as a fraction")
    gen.add_argument("--moving_average", type=float, default=0.9, help="beta of the generated-moment average")
    gen.add_argument("--eval_every", type=int, default=200)
    gen.add_argument("--eval_samples_per_class", type=int, default=50)
    gen.add_argument("--num_generators", type=int, default=1,
                     help="train this many generators on the one release (seeds --seed, --seed + 1, ...; no privacy cost) and "
                          "keep the one closest to it on a fresh sample: N times the generator time, against a generator "
                          "that loses a class (docs/mepf.md)")
    gen.add_argument("--select_samples_per_class", type=int, default=200, help="samples per class that choose among --num_generators")
    gen.add_argument("--z_dim", type=int, default=64)
    gen.add_argument("--base_channels", type=int, default=64)
    out = parser.add_argument_group("run")
    out.add_argument("--seed", type=int, default=0, help="data subset, generator init and sampling; NOT the privacy noise (OS entropy)")
    out.add_argument("--output_dir", default=None, help="required")
    out.add_argument("--resume", action="store_true", help="reuse the release in --output_dir (no new privacy cost) and continue training")
    out.add_argument("--grid_per_class", type=int, default=8)
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    out.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:i]")
    add_config_argument(parser)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.generator_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule, lr_decay_at=args.lr_decay_at, lr_decay_factor=args.lr_decay_factor,
        moving_average=args.moving_average, eval_every=args.eval_every, eval_samples_per_class=args.eval_samples_per_class,
        seed=args.seed,
    )


def validate(args: argparse.Namespace) -> EmbeddingConfig:
    """Every check that needs no data; raises before any work."""
    if not args.output_dir:
        raise ConfigError("--output_dir is required: the folder that receives privacy.json, the release and the generator")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file; pass a folder")
    has_release = (out / RELEASE_FILE).is_file()
    if has_release and not args.resume:
        raise PrivacyError(
            f"{out} already holds a DP-MEPF release: releasing again would spend the privacy budget a second time. "
            "Pass --resume to reuse it (no new cost), or choose a new --output_dir for a new release."
        )
    for name in ("generator_steps", "batch_size", "embed_batch_size", "eval_every", "eval_samples_per_class", "z_dim", "grid_per_class",
                 "num_generators"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.resolution is not None:
        upsampling_plan(args.resolution)
    _device(args.device)
    if args.feature_input_size < 32:
        raise ConfigError(f"--feature_input_size must be >= 32, got {args.feature_input_size}")
    if not (0.0 <= args.validation_fraction < 1.0):
        raise ConfigError(f"--validation_fraction must be in [0, 1), got {args.validation_fraction}")
    if not (0.0 <= args.moving_average < 1.0):
        raise ConfigError(f"--moving_average must be in [0, 1), got {args.moving_average}")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise ConfigError(f"--learning_rate must be > 0, got {args.learning_rate}")
    train_config(args)  # its own checks (steps, schedule, ...) before the release, not after it
    if args.num_generators > 1 and args.select_samples_per_class < 2:
        raise ConfigError(f"--select_samples_per_class must be >= 2, got {args.select_samples_per_class}")
    check_extractor_available(args.feature_extractor)
    if args.feature_layers is not None and not has_release:  # a reused release brings its own layers
        check_layers(args.feature_extractor, args.feature_layers)
    config = EmbeddingConfig(
        feature_extractor=args.feature_extractor,
        layers=list(args.feature_layers) if args.feature_layers is not None else None,
        input_size=args.feature_input_size,
        channel_stats=args.channel_stats,
        include_pooled=args.pooled_features,
        pixels=args.pixel_features,
        max_norm=args.max_grad_norm,
        moments=args.moments,
        labelled=args.labelled,
    )
    if not has_release:
        if not (0.0 < args.delta < 1.0):
            raise PrivacyError(f"--delta must lie in (0, 1), got {args.delta}")
        # fails now (not after embedding) when the target cannot be met
        noise_multiplier_for_releases(planned_releases(config, args.validation_fraction > 0), args.target_epsilon, args.delta)
    return config


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Exit code 0 on success, 2 on a user error (printed as one line, before any work)."""
    return run_command("mepf", args, parser, add_arguments, lambda a: train_mepf(a, validate(a)))


def train_mepf(args: argparse.Namespace, config: EmbeddingConfig) -> int:
    """The run itself: release (or reuse) the embedding, train, write everything."""
    out = Path(args.output_dir)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if (out / RELEASE_FILE).is_file():
        release = load_release(out)
        print(f"reusing the release in {out} (epsilon={release.privacy['epsilon']:.4g}, no new privacy cost)")
        config = release.config
    else:
        release = _release(args, config)
        save_release(release, out)
        config = release.config  # with its layers named
        p = release.privacy
        print(f"released: epsilon={p['epsilon']:.4g} delta={p['delta']:g} noise_multiplier={p['noise_multiplier']:.4g} "
              f"({len(p['releases'])} Gaussian releases, {p['neighbouring_relation']})")
    release_seconds = time.perf_counter() - started

    device = _device(args.device)
    extractor = build_extractor(config, batch_size=args.embed_batch_size, device=device)
    gen_config = GeneratorConfig(
        num_classes=len(release.class_names), resolution=release.resolution, channels=release.channels,
        z_dim=args.z_dim, base_channels=args.base_channels, class_names=release.class_names,
    )
    candidates = []
    if args.num_generators == 1:
        model = ConditionalGenerator(gen_config).to(device)
        result = train_generator(release, extractor, model, train_config(args), out, resume=args.resume, progress=args.progress)
    else:
        best, candidates = train_best_of(
            release, extractor, lambda: ConditionalGenerator(gen_config).to(device), train_config(args), args.num_generators, out,
            args.select_samples_per_class, resume=args.resume, progress=args.progress)
        result = best.result
        print("generators: " + ", ".join(f"seed {c.seed} {c.score:.4g}" for c in candidates) + f"; kept seed {best.seed}")

    write_json(out / GENERATION_FILE, {
        "method": "mepf", "class_names": release.class_names,
        "class_prompts": _prompts(release.class_names), "resolution": release.resolution, "channels": release.channels,
    })
    write_json(out / "mepf_config.json", {
        "flags": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "embedding": config.to_dict(), "generator": gen_config.to_dict(), "training": vars(train_config),
        "result": {"best_step": result.best_step, "best_score": result.best_score, "selected_by": result.selected_by,
                   "final_loss": result.losses[-1] if result.losses else None, "eval_steps": result.eval_steps,
                   "eval_scores": result.eval_scores, "eval_class_scores": result.eval_class_scores},
        "candidates": [{"seed": c.seed, "folder": c.folder, "score": c.score, "class_scores": c.class_scores,
                        "best_step": c.result.best_step, "kept": c is best} for c in candidates],
        "release_seconds": release_seconds,
    })
    images, _, _ = sample_mepf(out, args.grid_per_class, seed=args.seed)
    per_class = args.grid_per_class
    grid = [images[c * per_class + i] for i in range(per_class) for c in range(len(release.class_names))]
    save_grid(grid, out / "samples.png", nrow=len(release.class_names))
    print(f"generator: best step {result.best_step} (selected on the {result.selected_by} embedding), "
          f"final loss {result.losses[-1]:.4g}; wrote {out}")
    return 0


def _release(args: argparse.Namespace, config: EmbeddingConfig):
    from dpdiff.data import load_source
    from dpdiff.data.image_sets import ImageColumn, ImageTensors

    source = load_source(args.dataset, split=args.split, limit=args.limit, seed=args.seed)
    first = source.dataset[0]["image"]
    resolution = args.resolution or first.size[0]
    upsampling_plan(resolution)
    channels = args.channels or (1 if first.mode in ("L", "1", "I", "I;16", "F") else 3)
    images = ImageTensors(ImageColumn(source.dataset), resolution, channels)  # decoded a batch at a time: memory flat in N
    labels = torch.tensor(source.dataset["label"], dtype=torch.long)
    names = list(source.class_names) if config.labelled else ["image"]
    extractor = build_extractor(config, batch_size=args.embed_batch_size, device=_device(args.device))
    return release_embedding(
        extractor, images, labels if config.labelled else None, names, config,
        target_epsilon=args.target_epsilon, delta=args.delta, validation_fraction=args.validation_fraction,
        split_seed=args.seed, dataset=args.dataset + (f"[{args.split}, limit={args.limit}]" if args.limit else f"[{args.split}]"),
        batch_size=args.embed_batch_size, force_delta=args.force_delta, progress=args.progress,
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu or cuda[:i]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def _prompts(class_names: list[str]) -> list[str]:
    from dpdiff.data import prompt_for

    return [prompt_for(c) for c in class_names]
