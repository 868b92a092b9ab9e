"""DP-LDM fine-tuning (Lyu et al.): only the UNet's attention (transformer) blocks, from
--attention_start_index on, trained with DP-SGD (Opacus) under Accelerate.

    accelerate launch recipes/finetune_attention.py
    accelerate launch recipes/finetune_attention.py --config recipes/configs/finetune_attention.yaml

Leaves in --output_dir: unet/ (the fine-tuned UNet, `UNet2DConditionModel.from_pretrained` loads it),
privacy.json, generation_config.json, README.md (model card), samples.png, epsilon_curve.png."""

import sys

from dpdiff.training.cli import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main("attention", __doc__.splitlines()[0]))
