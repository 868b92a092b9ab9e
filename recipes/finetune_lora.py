"""DP-LoRA fine-tuning of a latent-diffusion pipeline (Tsai et al.): LoRA adapters on the UNet's
attention projections, trained with DP-SGD (Opacus) under Accelerate.

    accelerate launch recipes/finetune_lora.py                      # preset + Fashion-MNIST, epsilon=10
    accelerate launch recipes/finetune_lora.py --config recipes/configs/finetune_lora.yaml
    accelerate launch recipes/finetune_lora.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --dataset imagefolder:/data/private --target_epsilon 8 --push_to_hub --hub_model_id me/dp-lora
    accelerate launch recipes/finetune_lora.py --train_data_dir /data/private --train_batch_size 16 \
        --max_train_steps 200 --mixed_precision bf16 --validation_prompt "a red chair"   # diffusers' names: docs/recipes.md

Leaves in --output_dir: pytorch_lora_weights.safetensors, privacy.json, generation_config.json,
README.md (model card), samples.png, epsilon_curve.png."""

import sys

from dpdiff.training.cli import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main("lora", __doc__.splitlines()[0]))
