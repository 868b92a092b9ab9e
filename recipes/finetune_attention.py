"""DP-LDM fine-tuning (Lyu et al.): only the UNet's attention (transformer) blocks, from
--attention_start_index on, trained with DP-SGD (Opacus) under Accelerate.

    accelerate launch recipes/finetune_attention.py
    accelerate launch recipes/finetune_attention.py --config recipes/configs/finetune_attention.yaml

Leaves in --output_dir: unet/ (the fine-tuned UNet, `UNet2DConditionModel.from_pretrained` loads it),
privacy.json, generation_config.json, README.md (model card), samples.png, epsilon_curve.png."""

import argparse
import sys

from dpdiff.config import parse_with_config
from dpdiff.errors import DPDiffError
from dpdiff.training.arguments import add_finetune_arguments
from dpdiff.training.loop import finetune


def main(argv=None) -> int:
    parser = add_finetune_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), method="attention")
    try:
        args = parse_with_config(parser, argv)
        record = finetune(args).record
    except DPDiffError as e:
        print(f"finetune_attention: error: {e}", file=sys.stderr)
        return 2
    print(f"(epsilon, delta) = ({record['epsilon']:.4g}, {record['delta']:g}) after {record['steps']} DP-SGD steps; "
          f"UNet, privacy.json and model card in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
