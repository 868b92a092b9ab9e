"""`dpdiff finetune`: the same flags as `recipes/finetune_*.py`."""

from __future__ import annotations

import argparse

from dpdiff.config import add_config_argument, apply_config
from dpdiff.training.arguments import add_finetune_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_finetune_arguments(parser)
    add_config_argument(parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    from dpdiff.errors import DPDiffError
    from dpdiff.training.loop import finetune

    try:
        if parser is None:  # `dpdiff finetune` parsed args already; rebuild the flag table for --config
            parser = argparse.ArgumentParser()
            add_arguments(parser)
        args = apply_config(parser, args)
        record = finetune(args).record
    except DPDiffError as e:
        import sys

        print(f"dpdiff finetune: error: {e}", file=sys.stderr)
        return 2
    print(f"done: (epsilon, delta) = ({record['epsilon']:.4g}, {record['delta']:g}) after {record['steps']} steps -> {args.output_dir}")
    return 0
