"""Stable Diffusion 3 / 3.5: `SD3Transformer2DModel` (MMDiT) on CLIP-L + CLIP-G + T5 hidden states and
the pooled CLIP projections; rectified-flow matching, as diffusers' `train_dreambooth_lora_sd3.py`."""

from __future__ import annotations

import torch

from dpdiff.families.base import ModelFamily, batched, max_sequence_length
from dpdiff.families.objectives import FlowMatchingObjective
from dpdiff.families.registry import register_family

# attention projections of the image and the text stream (the diffusers SD3 LoRA script's defaults)
JOINT_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FlowFamily(ModelFamily):
    """What the flow-matching transformer families share: the training scheduler and objective."""

    denoiser_attr = "transformer"
    attention_block_lists = ("transformer_blocks",)
    condition_embedders = ("time_text_embed",)
    flow_matching = True

    def training_scheduler(self, pipeline):
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(pipeline.scheduler.config)
        if "flow_shift" in config and "shift" not in config:  # a DPM-Solver flow config (Sana)
            config["shift"] = config["flow_shift"]
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def objective(self, noise_scheduler, weighting_scheme: str = "none", **options):
        return FlowMatchingObjective(noise_scheduler, weighting_scheme=weighting_scheme, **options)


@register_family
class StableDiffusion3Family(FlowFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_classes = ("SD3Transformer2DModel",)
    condition_keys = ("encoder_hidden_states", "pooled_projections")
    default_lora_targets = JOINT_ATTENTION_TARGETS

    @torch.no_grad()
    def encode_conditions(self, pipeline, keys, resolution):
        length = max_sequence_length(pipeline, pipeline.tokenizer_3 or pipeline.tokenizer)
        device = pipeline.text_encoder.device
        embeds, pooled = [], []
        for chunk in batched(keys):
            e, _, p, _ = pipeline.encode_prompt(chunk, chunk, chunk, device=device, do_classifier_free_guidance=False,
                                                max_sequence_length=length)
            embeds.append(e.float().cpu())
            pooled.append(p.float().cpu())
        return {"encoder_hidden_states": torch.cat(embeds), "pooled_projections": torch.cat(pooled)}

    def predict(self, denoiser, noisy, timesteps, conditions):
        return denoiser(noisy, timestep=timesteps, encoder_hidden_states=conditions["encoder_hidden_states"],
                        pooled_projections=conditions["pooled_projections"]).sample

    def generate(self, pipeline, prompts, labels, *, generator, num_inference_steps, guidance_scale, resolution=None,
                 output_type="pil"):
        size = {} if resolution is None else {"height": resolution, "width": resolution}
        length = max_sequence_length(pipeline, pipeline.tokenizer_3 or pipeline.tokenizer)
        return pipeline(prompt=prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generator=generator, output_type=output_type, max_sequence_length=length, **size).images
