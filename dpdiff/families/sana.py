"""Sana: `SanaTransformer2DModel` (linear-attention DiT) on Gemma hidden states with their attention mask,
over a deep-compression autoencoder's latents; rectified-flow matching, as diffusers'
`train_dreambooth_lora_sana.py` (prompts encoded without the complex human instruction)."""

from __future__ import annotations

from dpdiff.families.base import encode_masked_prompts, max_sequence_length
from dpdiff.families.registry import register_family
from dpdiff.families.sd3 import FlowFamily


@register_family
class SanaFamily(FlowFamily):
    name = "sana"
    pipeline_classes = ("SanaPipeline",)
    denoiser_classes = ("SanaTransformer2DModel",)
    condition_keys = ("encoder_hidden_states", "encoder_attention_mask")
    condition_embedders = ("time_embed", "caption_projection")

    def encode_conditions(self, pipeline, keys, resolution):
        return encode_masked_prompts(pipeline, keys, complex_human_instruction=None)

    def predict(self, denoiser, noisy, timesteps, conditions):
        from dpdiff.families.base import unwrap_model

        scale = float(getattr(unwrap_model(denoiser).config, "timestep_scale", 1.0) or 1.0)
        return denoiser(noisy, encoder_hidden_states=conditions["encoder_hidden_states"],
                        encoder_attention_mask=conditions["encoder_attention_mask"], timestep=timesteps * scale).sample

    def generate(self, pipeline, prompts, labels, *, generator, num_inference_steps, guidance_scale, resolution=None,
                 output_type="pil"):
        size = {} if resolution is None else {"height": resolution, "width": resolution}
        return pipeline(prompt=prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generator=generator, output_type=output_type, use_resolution_binning=False,
                        complex_human_instruction=None,
                        max_sequence_length=max_sequence_length(pipeline, pipeline.tokenizer), **size).images
