"""DiT (class-conditional): `DiTTransformer2DModel` conditioned on class labels, no text encoder;
DDPM noising, epsilon target (the variance half of its output is ignored, as DiTPipeline does).

The private labels are the class ids (Fashion-MNIST 0..9 reuse the first ids of the base's table);
the unconditional "class" is the table's extra row, `num_embeds_ada_norm`, which DiTPipeline uses for
guidance. The label embedding's own random label dropout is switched off during training: the
latent cache's keyed `cond_dropout` coin plays that role, reproducibly."""

from __future__ import annotations

import torch

from dpdiff.families.base import NULL_LABEL, ModelFamily
from dpdiff.families.peft_export import PeftExport
from dpdiff.families.pixart import epsilon_half
from dpdiff.families.registry import register_family


@register_family
class DiTFamily(PeftExport, ModelFamily):
    name = "dit"
    pipeline_classes = ("DiTPipeline",)
    denoiser_classes = ("DiTTransformer2DModel",)
    denoiser_attr = "transformer"
    conditioning = "label"
    condition_keys = ("class_labels",)
    attention_block_lists = ("transformer_blocks",)

    def encode_conditions(self, pipeline, keys, resolution):
        num_classes = int(self.denoiser(pipeline).config.num_embeds_ada_norm)
        labels = [num_classes if k == NULL_LABEL else int(k) for k in keys]
        bad = [k for k in labels[:-1] if not 0 <= k < num_classes]
        if bad:
            from dpdiff.errors import DataError

            raise DataError(f"class labels {sorted(set(bad))[:5]} are outside the DiT's {num_classes} classes (0..{num_classes - 1})")
        return {"class_labels": torch.tensor(labels, dtype=torch.long)}

    def train_mode(self, denoiser):
        denoiser.train()
        for module in denoiser.modules():
            if type(module).__name__ == "LabelEmbedding":
                # no random label dropout inside the forward (see the module docstring); eval() instead would
                # also stop Opacus from recording the embedding's inputs. The null-class row stays.
                module.dropout_prob = 0.0

    def predict(self, denoiser, noisy, timesteps, conditions):
        out = denoiser(noisy, timestep=timesteps, class_labels=conditions["class_labels"]).sample
        return epsilon_half(out, noisy.shape[1])

    def generate(self, pipeline, prompts, labels, *, generator, num_inference_steps, guidance_scale, resolution=None,
                 output_type="pil"):
        out = pipeline(class_labels=list(labels), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       generator=generator, output_type=output_type)
        return out.images

    def usage_call(self, prompt, num_inference_steps, guidance_scale):
        return f"image = pipe(class_labels=[0], num_inference_steps={num_inference_steps}, guidance_scale={guidance_scale}).images[0]"
