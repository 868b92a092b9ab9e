"""`dpdiff budget`: noise multiplier <-> epsilon for a DP-SGD run, before spending any compute.

    dpdiff budget --epsilon 8 --batch-size 256 --num-examples 60000 --epochs 10
    dpdiff budget --noise-multiplier 1.0 --sample-rate 0.004267 --steps 1000 --json
    dpdiff budget --epsilon 10 --num-examples 60000 --tune recipes/configs/tune_lora.yaml   # a search: dpdiff/tuning/budget.py

A user mistake prints one clear line on stderr and exits with code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

from dpdiff.errors import ConfigError, DPDiffError
from dpdiff.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    DEFAULT_DELTA,
    check_delta,
    check_epsilon,
    epsilon_for,
    noise_multiplier_for,
    steps_for,
    validate_step,
)

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--epsilon", type=float, help="target epsilon: print the noise multiplier that reaches it")
    goal.add_argument("--noise-multiplier", type=float, help="noise multiplier sigma: print the epsilon it reaches")
    parser.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="delta (default 1e-5; must be < 1/n)")
    parser.add_argument("--sample-rate", type=float, help="Poisson sampling rate q (or give --batch-size and --num-examples)")
    parser.add_argument("--batch-size", type=int, help="expected (logical) batch size B; q = B / n")
    parser.add_argument("--num-examples", type=int, help="number of private training examples n")
    length = parser.add_mutually_exclusive_group()  # one of them is needed, unless --tune gives the lengths
    length.add_argument("--steps", type=int, help="number of DP-SGD steps T")
    length.add_argument("--epochs", type=float, help="epochs; T = ceil(epochs / q)")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default=DEFAULT_ACCOUNTANT, help="default: prv (tight)")
    parser.add_argument(
        "--force-delta", action="store_true", help="allow delta >= 1/n (weakens the guarantee; not recommended)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    try:
        result = compute_budget(args)
    except DPDiffError as err:
        print(f"dpdiff budget: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_budget(result))
    return 0


def compute_budget(args: argparse.Namespace) -> dict:
    """Validate the options (all of them, before any accounting) and compute the other side."""
    sample_rate, num_examples = _sample_rate(args)
    delta = check_delta(args.delta, num_examples, force=args.force_delta)
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.steps is None and args.epochs is None:
        raise ConfigError("give --steps or --epochs (or --tune with a search config)")
    steps = steps_for(sample_rate, epochs=args.epochs, max_steps=args.steps)
    result = {
        "delta": delta,
        "sample_rate": sample_rate,
        "steps": steps,
        "epochs": args.epochs if args.epochs is not None else steps * sample_rate,
        "accountant": args.accountant,
        "num_examples": num_examples,
        "batch_size": args.batch_size,
        "target_epsilon": None,
    }
    if args.epsilon is not None:
        target = check_epsilon(args.epsilon)
        sigma = noise_multiplier_for(target, sample_rate, steps, delta, args.accountant)
        result["target_epsilon"] = target
    else:
        sigma = validate_step(args.noise_multiplier, sample_rate, steps)[0]
        if sigma <= 0:
            raise ConfigError("--noise-multiplier must be > 0 (without noise there is no finite epsilon)")
    result["noise_multiplier"] = sigma
    result["epsilon"] = epsilon_for(sigma, sample_rate, steps, delta, args.accountant)
    return result


def _sample_rate(args) -> tuple[float, int | None]:
    by_size = args.batch_size is not None or args.num_examples is not None
    if args.sample_rate is not None and by_size:
        raise ConfigError("give either --sample-rate or --batch-size with --num-examples, not both")
    if args.sample_rate is not None:
        q = args.sample_rate
        if not (0.0 < q <= 1.0):
            raise ConfigError(f"--sample-rate must be in (0, 1], got {q:g}")
        return q, None
    if args.batch_size is None or args.num_examples is None:
        raise ConfigError("give --sample-rate, or both --batch-size and --num-examples")
    if args.num_examples < 1 or args.batch_size < 1:
        raise ConfigError("--batch-size and --num-examples must be >= 1")
    if args.batch_size > args.num_examples:
        raise ConfigError(
            f"--batch-size {args.batch_size} > --num-examples {args.num_examples}: the sample rate would exceed 1"
        )
    return args.batch_size / args.num_examples, args.num_examples


def format_budget(result: dict) -> str:
    rows = []
    if result["target_epsilon"] is not None:
        rows.append(("noise multiplier", f"{result['noise_multiplier']:.4f}"))
        rows.append(("epsilon", f"{result['epsilon']:.4f}  (target {result['target_epsilon']:g})"))
    else:
        rows.append(("epsilon", f"{result['epsilon']:.4f}"))
        rows.append(("noise multiplier", f"{result['noise_multiplier']:g}"))
    rows.append(("delta", f"{result['delta']:g}"))
    q = f"{result['sample_rate']:.6g}"
    if result["batch_size"] is not None:
        q += f"  ({result['batch_size']}/{result['num_examples']})"
    rows.append(("sample rate", q))
    rows.append(("steps", f"{result['steps']}  ({result['epochs']:.3g} epochs)"))
    rows.append(("accountant", result["accountant"]))
    lines = [f"{name:<17}{value}" for name, value in rows]
    if result["num_examples"] is None:
        lines.append("note: delta < 1/n not checked; pass --batch-size and --num-examples to check it")
    return "\n".join(lines)
