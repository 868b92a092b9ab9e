"""`dpdiff finetune`: the same flags as `recipes/finetune_*.py`."""

from __future__ import annotations

import argparse

from dpdiff.config import add_config_argument, run_command
from dpdiff.training.arguments import add_finetune_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_finetune_arguments(parser)
    add_config_argument(parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    return run_command("finetune", args, parser, add_arguments, _finetune)


def _finetune(args: argparse.Namespace) -> int:
    from dpdiff.training.loop import finetune

    record = finetune(args).record
    if record.get("dry_run"):  # the plan was printed; nothing was loaded or trained
        return 0
    print(f"done: (epsilon, delta) = ({record['epsilon']:.4g}, {record['delta']:g}) after {record['steps']} steps -> {args.output_dir}")
    return 0


def recipe_main(method: str, description: str, argv=None) -> int:
    """The body of `recipes/finetune_<method>.py`: flags + YAML -> finetune -> one summary line."""
    import os
    import sys

    from dpdiff.config import FlagParser, parse_with_config
    from dpdiff.errors import DPDiffError
    from dpdiff.training.loop import finetune

    parser = add_finetune_arguments(FlagParser(prog=f"finetune_{method}", description=description), method=method)
    try:
        args = parse_with_config(parser, argv)
        record = finetune(args).record
    except DPDiffError as e:
        print(f"finetune_{method}: error: {e}", file=sys.stderr)
        return 2
    if record.get("dry_run"):
        return 0
    if int(os.environ.get("RANK", "0")) != 0:  # one summary line per job, not one per process
        return 0
    saved = "adapter" if method == "lora" else "UNet"
    print(f"(epsilon, delta) = ({record['epsilon']:.4g}, {record['delta']:g}) after {record['steps']} DP-SGD steps; "
          f"{saved}, privacy.json and model card in {args.output_dir}")
    return 0
