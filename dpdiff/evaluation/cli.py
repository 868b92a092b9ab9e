"""`dpdiff evaluate`: score a synthetic labelled dataset against the real data it imitates.

    dpdiff evaluate --real fashion_mnist --synthetic samples/ --metrics fd,cnn,logreg,mlp --output results.json

Every image (real and synthetic) is first converted to the real set's format (its resolution and
channels; bicubic resize), so both metrics compare like with like. A user mistake prints one clear
line on stderr and exits with code 2 before any model is trained.
"""

from __future__ import annotations

import argparse
import sys
import time

from dpdiff.config import add_config_argument, run_command
from dpdiff.errors import ConfigError

METRICS = ("fd", "cnn", "logreg", "mlp", "fid_inception")
DEFAULT_METRICS = "fd,cnn,logreg,mlp"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags use underscores like the other subcommands; the dashed spellings work too."""
    parser.add_argument("--real", help="real dataset: fashion_mnist, mnist5k, animal_mnist, imagefolder:PATH or a hub id")
    parser.add_argument("--synthetic", help="synthetic dataset folder written by `dpdiff sample` (imagefolder or save_to_disk)")
    parser.add_argument("--metrics", default=DEFAULT_METRICS, help=f"comma-separated, from {', '.join(METRICS)} (default {DEFAULT_METRICS})")
    parser.add_argument("--test_split", "--test-split", dest="test_split", default="test", help="real split the classifiers are tested on and FD compares with")
    parser.add_argument("--num_fd_samples", "--num-fd-samples", dest="num_fd_samples", type=int, default=10000, help="images per side for FD (default 10000)")
    parser.add_argument("--fd_input_size", "--fd-input-size", dest="fd_input_size", type=int, default=224, help="side the FD extractor resizes to (default 224)")
    parser.add_argument("--fd_batch_size", "--fd-batch-size", dest="fd_batch_size", type=int, default=64)
    parser.add_argument("--fd_real_stats", "--fd-real-stats", dest="fd_real_stats", default=None,
                        help="a .npz for the real side's FD statistics: written on the first run, reused by later runs with "
                             "the same real set, split, limit, seed, sample count and input size (minutes of CPU each); "
                             "it records the settings, not the images: delete it when the real images change")
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every classifier (default: cnn 10, logreg 20, mlp 20)")
    parser.add_argument("--repeats", type=int, default=1, help="train each classifier this many times from other seeds and "
                        "report mean and std (one CNN moves by ~1 point with its seed alone)")
    parser.add_argument("--real_limit", "--real-limit", dest="real_limit", type=int, default=None, help="use a seeded subset of the real split (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    add_config_argument(parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    return run_command("evaluate", args, parser, add_arguments, _evaluate_and_report)


def _evaluate_and_report(args: argparse.Namespace) -> int:
    results = evaluate(args, check_arguments(args))
    print(format_results(results))
    if args.output:
        from dpdiff.io import write_json

        write_json(args.output, results)
        print(f"wrote {args.output}")
    return 0


def check_arguments(args: argparse.Namespace) -> list[str]:
    if not args.real or not args.synthetic:
        raise ConfigError("--real and --synthetic are required, e.g. --real fashion_mnist --synthetic samples/")
    metrics = [m.strip() for m in str(args.metrics).split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"unknown metric(s) {unknown or args.metrics!r}; choose from {', '.join(METRICS)}")
    for flag, value, minimum in (("--num_fd_samples", args.num_fd_samples, 2), ("--fd_batch_size", args.fd_batch_size, 1), ("--fd_input_size", args.fd_input_size, 32)):
        if value < minimum:
            raise ConfigError(f"{flag} must be at least {minimum}, got {value}")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {args.epochs}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
    if args.real_limit is not None and args.real_limit < 1:
        raise ConfigError(f"--real_limit must be positive, got {args.real_limit}")
    if "fid_inception" in metrics:
        from dpdiff.evaluation.frechet import check_inception_available

        check_inception_available()
    return list(dict.fromkeys(metrics))


def evaluate(args: argparse.Namespace, metrics: list[str]) -> dict:
    """Load and check both sets (all errors surface here, before any training), then score."""
    import torch

    from dpdiff.data import load_source
    from dpdiff.data.image_sets import ImageColumn, ImageTensors
    from dpdiff.evaluation.synthetic import load_synthetic

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    real = load_source(args.real, split=args.test_split, limit=args.real_limit, seed=args.seed)
    synthetic = load_synthetic(args.synthetic, real.class_names)
    real_images = ImageColumn(real.dataset)  # decoded when read: FD reads its subset in batches, nothing more
    first = real_images[0]
    resolution = max(first.size)
    channels = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3
    x_real = ImageTensors(real_images, resolution, channels)
    y_real = torch.tensor(real.dataset["label"], dtype=torch.long)
    x_syn = ImageTensors(synthetic.images, resolution, channels)
    y_syn = torch.as_tensor(synthetic.labels, dtype=torch.long)
    classifiers = [m for m in metrics if m in ("cnn", "logreg", "mlp")]
    if classifiers:
        _check_classifier_memory(len(x_real) + len(x_syn), resolution, channels)

    results: dict = {
        "real": args.real,
        "real_split": args.test_split,
        "synthetic": str(args.synthetic),
        "num_real": len(x_real),
        "num_synthetic": len(x_syn),
        "class_names": list(real.class_names),
        "preprocessing": f"every image -> {resolution}x{resolution} {'grey' if channels == 1 else 'RGB'} (the real set's format), bicubic, pixels in [-1, 1]",
        "seed": args.seed,
        "device": str(device),
    }
    if "fd" in metrics or "fid_inception" in metrics:
        n = min(args.num_fd_samples, len(x_real), len(x_syn))
        if n < args.num_fd_samples:
            print(f"dpdiff evaluate: note: FD uses {n} images per side (fewer than --num_fd_samples {args.num_fd_samples} available); "
                  "FD grows as N shrinks, compare only values with equal N", file=sys.stderr)
        generator = torch.Generator().manual_seed(args.seed)
        fd_real = x_real[torch.randperm(len(x_real), generator=generator)[:n]]
        fd_syn = x_syn[torch.randperm(len(x_syn), generator=generator)[:n]]
        if "fd" in metrics:
            results["fd"] = _fd(args, fd_real, fd_syn, device)
        if "fid_inception" in metrics:
            from dpdiff.evaluation.frechet import inception_fid

            results["fid_inception"] = inception_fid(fd_real, fd_syn, device)
    if classifiers:
        from dpdiff.evaluation.classifiers import evaluate_downstream

        results["downstream"] = evaluate_downstream(
            x_syn.tensor(), y_syn, x_real.tensor(), y_real, classifiers=classifiers, epochs=args.epochs, seed=args.seed,
            class_names=real.class_names, device=device, repeats=args.repeats,
        )
        results["downstream"]["protocol"] = f"train on the {len(x_syn)} synthetic images, test on {len(x_real)} real {args.test_split} images"
    return results


def _check_classifier_memory(num_images: int, resolution: int, channels: int) -> None:
    """The classifiers train on both sets held as float tensors (FD streams): refuse, before any work, sets that
    would not fit in the host's free memory."""
    import torch

    from dpdiff.training.memory_plan import available_bytes

    need, free = 4 * num_images * channels * resolution**2, available_bytes(torch.device("cpu"))  # float32 copies
    if free is not None and need > 0.9 * free:
        raise ConfigError(f"the downstream classifiers hold both sets in memory: {num_images} images at "
                          f"{resolution}x{resolution} need {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free. They "
                          "are small-image metrics: score large images with --metrics fd (it streams), or pass --real_limit")


def _fd(args: argparse.Namespace, fd_real, fd_syn, device) -> dict:
    """FD (EfficientNet-Lite0); the real side's statistics come from --fd_real_stats when it holds them."""
    from dpdiff.evaluation.frechet import cached_statistics, compute_fd, load_statistics
    from dpdiff.features import load_feature_extractor

    key = {"real": args.real, "split": args.test_split, "real_limit": args.real_limit, "seed": args.seed,
           "num_images": len(fd_real), "image_format": list(fd_real.shape[1:]), "extractor": "efficientnet_lite0",
           "input_size": args.fd_input_size}
    if args.fd_real_stats:
        load_statistics(args.fd_real_stats, key)  # a file of other settings fails here, before the extractor loads
    start = time.perf_counter()
    extractor = load_feature_extractor("efficientnet_lite0", input_size=args.fd_input_size, batch_size=args.fd_batch_size, device=device)
    stats, reused = (cached_statistics(fd_real, extractor, args.fd_real_stats, key, args.fd_batch_size)
                     if args.fd_real_stats else (None, False))
    fd = compute_fd(fd_real, fd_syn, extractor, args.fd_batch_size, real_split=args.test_split, real_statistics=stats)
    fd["wall_seconds"] = time.perf_counter() - start
    if args.fd_real_stats:
        fd["real_statistics"] = {"file": str(args.fd_real_stats), "reused": reused}
    return fd


def format_results(results: dict) -> str:
    lines = [f"synthetic {results['synthetic']} ({results['num_synthetic']} images) vs real {results['real']} {results['real_split']} ({results['num_real']} images)",
             f"preprocessing: {results['preprocessing']}", ""]
    if "fd" in results:
        lines.append(f"{results['fd']['description']}: {results['fd']['value']:.3f}")
    if "fid_inception" in results:
        lines.append(f"{results['fid_inception']['metric']}, {results['fid_inception']['num_real']} vs {results['fid_inception']['num_synthetic']}: {results['fid_inception']['value']:.3f}")
    downstream = results.get("downstream")
    if downstream:
        models = [m for m in ("cnn", "logreg", "mlp") if m in downstream]
        repeats = max(downstream[m].get("repeats", 1) for m in models)
        mean_of = f"; mean over {repeats} seeds of each classifier" if repeats > 1 else ""
        lines.append(f"downstream accuracy ({downstream['protocol']}{mean_of}):")
        names = results["class_names"]
        width = max(len("overall"), *(len(n) for n in names))
        lines.append(f"  {'class':<{width}}  {'train n':>7}  " + "  ".join(f"{m:>7}" for m in models))
        lines.append(f"  {'overall':<{width}}  {results['num_synthetic']:>7}  " + "  ".join(f"{downstream[m]['accuracy']:>7.4f}" for m in models))
        if any("accuracy_std" in downstream[m] for m in models):
            lines.append(f"  {'(std)':<{width}}  {'':>7}  " + "  ".join(f"{downstream[m].get('accuracy_std', 0.0):>7.4f}" for m in models))
        for name in names:
            cells = [downstream[m]["per_class_accuracy"][name] for m in models]
            lines.append(f"  {name:<{width}}  {downstream['train_count_per_class'][name]:>7}  "
                         + "  ".join(f"{c:>7.4f}" if c is not None else f"{'-':>7}" for c in cells))
    return "\n".join(lines)
