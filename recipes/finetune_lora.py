"""DP-LoRA fine-tuning of a latent-diffusion pipeline (Tsai et al.): LoRA adapters on the UNet's
attention projections, trained with DP-SGD (Opacus) under Accelerate.

    accelerate launch recipes/finetune_lora.py                      # preset + Fashion-MNIST, epsilon=10
    accelerate launch recipes/finetune_lora.py --config recipes/configs/finetune_lora.yaml
    accelerate launch recipes/finetune_lora.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --dataset imagefolder:/data/private --target_epsilon 8 --push_to_hub --hub_model_id me/dp-lora

Leaves in --output_dir: pytorch_lora_weights.safetensors, privacy.json, generation_config.json,
README.md (model card), samples.png, epsilon_curve.png."""

import argparse
import sys

from dpdiff.config import parse_with_config
from dpdiff.errors import DPDiffError
from dpdiff.training.arguments import add_finetune_arguments
from dpdiff.training.loop import finetune


def main(argv=None) -> int:
    parser = add_finetune_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), method="lora")
    try:
        args = parse_with_config(parser, argv)
        record = finetune(args).record
    except DPDiffError as e:
        print(f"finetune_lora: error: {e}", file=sys.stderr)
        return 2
    print(f"(epsilon, delta) = ({record['epsilon']:.4g}, {record['delta']:g}) after {record['steps']} DP-SGD steps; "
          f"adapter, privacy.json and model card in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
