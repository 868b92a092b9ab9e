"""The `dpdiff` command: differentially private fine-tuning of diffusers pipelines, sampling, evaluation,
privacy budgets and audits.

Each subcommand lives next to the code it drives and is imported lazily, so `dpdiff budget` does not pay
for importing diffusers. Errors are one line: an unknown flag names the closest known one."""

from __future__ import annotations

import importlib
import sys

from dpdiff.config import FlagParser

# subcommand -> module exposing `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "finetune": ("dpdiff.training.cli", "DP fine-tune a diffusion pipeline (lora | attention | full)"),
    "sample": ("dpdiff.sampling", "sample a fine-tuned pipeline or a MEPF generator into a dataset"),
    "mepf": ("dpdiff.mepf.cli", "train the DP-MEPF baseline generator"),
    "evaluate": ("dpdiff.evaluation.cli", "score a synthetic dataset against real data"),
    "tune": ("dpdiff.tuning.cli", "private hyperparameter search: one (epsilon, delta) for every trial and the selection"),
    "budget": ("dpdiff.tuning.budget", "noise multiplier <-> epsilon for DP-SGD (--tune: for a whole search)"),
    "audit": ("dpdiff.audit", "empirical lower bound on epsilon with canaries"),
}


def build_parser(argv: list[str]) -> tuple[FlagParser, object | None]:
    parser = FlagParser(prog="dpdiff", description=__doc__.split("\n\n")[0].replace("\n", " "),
                        epilog="`dpdiff COMMAND --help` lists a command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=FlagParser)
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # only import the module of the subcommand that was asked for
        if argv and argv[0] == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
