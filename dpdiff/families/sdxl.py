"""SDXL: a `UNet2DConditionModel` with `addition_embed_type="text_time"`, conditioned on the two
CLIP encoders' penultimate hidden states (concatenated), the pooled output of `text_encoder_2`
and the size/crop `time_ids`, as diffusers' `train_text_to_image_lora_sdxl.py` builds them."""

from __future__ import annotations

import torch

from dpdiff.families.registry import register_family
from dpdiff.families.stable_diffusion import StableDiffusionFamily


@register_family
class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    condition_keys = ("encoder_hidden_states", "text_embeds", "time_ids")

    @torch.no_grad()
    def encode_conditions(self, pipeline, keys, resolution):
        device = pipeline.text_encoder_2.device
        hidden, pooled = [], []
        for i in range(0, len(keys), 64):
            embeds, _, pooled_embeds, _ = pipeline.encode_prompt(
                list(keys[i : i + 64]), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            hidden.append(embeds.float().cpu())
            pooled.append(pooled_embeds.float().cpu())
        hidden, pooled = torch.cat(hidden), torch.cat(pooled)
        # images are resized to the training resolution without cropping: original = target size, crop (0, 0)
        time_ids = pipeline._get_add_time_ids(
            (resolution, resolution), (0, 0), (resolution, resolution), dtype=torch.float32,
            text_encoder_projection_dim=int(pipeline.text_encoder_2.config.projection_dim),
        )
        return {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": time_ids.expand(len(keys), -1).clone()}

    def predict(self, denoiser, noisy, timesteps, conditions):
        added = {"text_embeds": conditions["text_embeds"], "time_ids": conditions["time_ids"]}
        return denoiser(noisy, timesteps, encoder_hidden_states=conditions["encoder_hidden_states"],
                        added_cond_kwargs=added).sample
