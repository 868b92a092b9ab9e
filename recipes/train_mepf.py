"""Train the DP-MEPF baseline: one DP release of perceptual-feature embeddings, then a generator.

    python recipes/train_mepf.py --config recipes/configs/mepf.yaml
    python recipes/train_mepf.py --output_dir runs/mepf --target_epsilon 10 --limit 2000

Flags and YAML keys have the same names; flags on the command line win. Same flags as
`dpdiff mepf`. Single process: the one private pass is a forward pass of a frozen extractor."""

from __future__ import annotations

import argparse
import sys

from dpdiff.config import parse_with_config
from dpdiff.mepf.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parse_with_config(parser, argv), parser)


if __name__ == "__main__":
    sys.exit(main())
