"""PixArt-α / PixArt-Σ: `PixArtTransformer2DModel` on T5 hidden states with their attention mask;
DDPM noising, epsilon target (the transformer also predicts a variance: its second half is ignored,
as the pipelines do). The pipelines have no LoRA loader: adapters are plain peft (peft_export)."""

from __future__ import annotations

import torch

from dpdiff.families.base import ModelFamily, encode_masked_prompts, max_sequence_length, unwrap_model
from dpdiff.families.peft_export import PeftExport
from dpdiff.families.registry import register_family


def epsilon_half(prediction: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """Denoisers with a learned variance output 2C channels: the first C are the noise prediction."""
    return prediction[:, :latent_channels] if prediction.shape[1] == 2 * latent_channels else prediction


@register_family
class PixArtFamily(PeftExport, ModelFamily):
    name = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    denoiser_classes = ("PixArtTransformer2DModel",)
    denoiser_attr = "transformer"
    condition_keys = ("encoder_hidden_states", "encoder_attention_mask", "resolution", "aspect_ratio")
    condition_embedders = ("adaln_single", "caption_projection")
    attention_block_lists = ("transformer_blocks",)

    def encode_conditions(self, pipeline, keys, resolution):
        n = len(keys)
        # micro-conditions of the 1024-px alpha checkpoints (used only when the transformer asks for them)
        size = torch.tensor([[float(resolution), float(resolution)]]).expand(n, -1).clone()
        return {**encode_masked_prompts(pipeline, keys), "resolution": size, "aspect_ratio": torch.ones(n, 1)}

    def predict(self, denoiser, noisy, timesteps, conditions):
        extra = {"resolution": None, "aspect_ratio": None}
        if _config(denoiser).use_additional_conditions:
            extra = {"resolution": conditions["resolution"], "aspect_ratio": conditions["aspect_ratio"]}
        out = denoiser(noisy, encoder_hidden_states=conditions["encoder_hidden_states"],
                       encoder_attention_mask=conditions["encoder_attention_mask"], timestep=timesteps,
                       added_cond_kwargs=extra).sample
        return epsilon_half(out, noisy.shape[1])

    def generate(self, pipeline, prompts, labels, *, generator, num_inference_steps, guidance_scale, resolution=None,
                 output_type="pil"):
        size = {} if resolution is None else {"height": resolution, "width": resolution}
        return pipeline(prompt=prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generator=generator, output_type=output_type, use_resolution_binning=False,
                        max_sequence_length=max_sequence_length(pipeline, pipeline.tokenizer), **size).images


def _config(denoiser):
    return unwrap_model(denoiser).config
