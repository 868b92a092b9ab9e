"""SD-1.x / SD-2.x: `UNet2DConditionModel` conditioned on one CLIP text encoder's last hidden states
(epsilon or v-prediction, DDPM noising)."""

from __future__ import annotations

import torch

from dpdiff.families.base import ModelFamily
from dpdiff.families.registry import register_family


@torch.no_grad()
def encode_clip_prompts(text_encoder, tokenizer, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """[len(prompts), T, D] last hidden states, padded to the tokenizer's max length as SD does."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(
            prompts[i : i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(text_encoder.device)
        out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


@register_family
class StableDiffusionFamily(ModelFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser_classes = ("UNet2DConditionModel",)
    denoiser_attr = "unet"
    condition_embedders = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj")
    attention_block_types = ("Transformer2DModel",)

    def encode_conditions(self, pipeline, keys, resolution):
        return {"encoder_hidden_states": encode_clip_prompts(pipeline.text_encoder, pipeline.tokenizer, list(keys))}

    def attention_blocks(self, denoiser):
        return unet_attention_blocks(denoiser, self.attention_block_types)


def unet_attention_blocks(unet, block_types) -> list:
    """The UNet's transformer blocks in network-depth order (down, mid, up).

    Registration order in diffusers is down, up, mid, so `named_modules` order is not depth order."""
    blocks = []
    for prefix in ("down_blocks", "mid_block", "up_blocks"):
        part = getattr(unet, prefix, None)
        if part is None:
            continue
        for name, module in part.named_modules(prefix=prefix):
            if type(module).__name__ in block_types:
                blocks.append((name, module))
    return blocks
