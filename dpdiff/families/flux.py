"""Flux: `FluxTransformer2DModel` on T5 hidden states and the pooled CLIP output, over 2x2-packed latent
tokens with their position ids; rectified-flow matching with the embedded guidance of the distilled
-dev checkpoints, as diffusers' `train_dreambooth_lora_flux.py` trains it (timestep / 1000)."""

from __future__ import annotations

import torch

from dpdiff.families.base import batched, max_sequence_length, vae_scale_factor
from dpdiff.families.registry import register_family
from dpdiff.families.sd3 import JOINT_ATTENTION_TARGETS, FlowFamily

TRAINING_GUIDANCE = 3.5  # the diffusers Flux scripts' --guidance_scale for guidance-distilled models


@register_family
class FluxFamily(FlowFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_classes = ("FluxTransformer2DModel",)
    condition_keys = ("encoder_hidden_states", "pooled_projections")
    default_lora_targets = JOINT_ATTENTION_TARGETS
    attention_block_lists = ("transformer_blocks", "single_transformer_blocks")

    def resolution(self, pipeline) -> int:
        return int(pipeline.default_sample_size) * vae_scale_factor(pipeline)

    def resolution_multiple(self, pipeline) -> int:
        return 2 * vae_scale_factor(pipeline)  # latents are packed in 2x2 patches

    def latent_channels(self, denoiser):
        return int(denoiser.config.in_channels) // 4  # the transformer sees 2x2 patches of the VAE latent

    @torch.no_grad()
    def encode_conditions(self, pipeline, keys, resolution):
        length = max_sequence_length(pipeline, pipeline.tokenizer_2)
        device = pipeline.text_encoder.device
        embeds, pooled = [], []
        for chunk in batched(keys):
            e, p, _ = pipeline.encode_prompt(chunk, chunk, device=device, max_sequence_length=length)
            embeds.append(e.float().cpu())
            pooled.append(p.float().cpu())
        return {"encoder_hidden_states": torch.cat(embeds), "pooled_projections": torch.cat(pooled)}

    def predict(self, denoiser, noisy, timesteps, conditions):
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        hidden = conditions["encoder_hidden_states"]
        txt_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        config = _guidance_embeds(denoiser)
        guidance = torch.full((b,), TRAINING_GUIDANCE, device=noisy.device) if config else None
        out = denoiser(packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=conditions["pooled_projections"], encoder_hidden_states=hidden,
                       txt_ids=txt_ids, img_ids=img_ids).sample
        return FluxPipeline._unpack_latents(out, h, w, 1)

    def generate(self, pipeline, prompts, labels, *, generator, num_inference_steps, guidance_scale, resolution=None,
                 output_type="pil"):
        size = {} if resolution is None else {"height": resolution, "width": resolution}
        return pipeline(prompt=prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generator=generator, output_type=output_type,
                        max_sequence_length=max_sequence_length(pipeline, pipeline.tokenizer_2), **size).images


def _guidance_embeds(denoiser) -> bool:
    from dpdiff.families.base import unwrap_model

    return bool(unwrap_model(denoiser).config.guidance_embeds)
