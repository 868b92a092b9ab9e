"""`dpdiff budget`: privacy/budget_cli.py's command, plus `--tune SEARCH_YAML` (what a whole search costs).

It lives here, above privacy/, so that the DP mechanism's room knows nothing of the search (tests/test_house.py);
without --tune it imports nothing more than the plain command (no diffusers)."""

from __future__ import annotations

import argparse

from dpdiff.privacy import budget_cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    budget_cli.add_arguments(parser)
    parser.add_argument("--tune", metavar="SEARCH_YAML", default=None,
                        help="a `dpdiff tune` search config: print each trial's sigma for a whole search within --epsilon "
                             "(with --num-examples), beside one trial's and the naive composed epsilon")


def run(args: argparse.Namespace) -> int:
    if args.tune:
        from dpdiff.tuning.cli import budget_main

        return budget_main(args)
    return budget_cli.run(args)
