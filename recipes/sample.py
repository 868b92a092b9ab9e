"""Sample a synthetic dataset from a DP fine-tuned run (or a DP-MEPF generator).

    python recipes/sample.py --config recipes/configs/sample.yaml
    python recipes/sample.py --model_dir runs/dp-lora --output_dir synthetic --num_per_class 100 --resolution 28

Flags and YAML keys have the same names; flags on the command line win. Same flags as
`dpdiff sample`. The synthetic set keeps the run's (epsilon, delta): sampling is post-processing."""

from __future__ import annotations

import argparse
import sys

from dpdiff.config import parse_with_config
from dpdiff.sampling import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parse_with_config(parser, argv), parser)


if __name__ == "__main__":
    sys.exit(main())
