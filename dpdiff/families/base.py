"""What one diffusers model family is, to the rest of dpdiff.

A family says which pipeline component is the denoiser, how prompts (or class labels) become the
per-example conditioning through the frozen encoders (once, into the latent cache), how the
denoiser is called, which objective trains it, the default LoRA targets and `attention` blocks,
and how the trained part is exported so that the family's stock pipeline loads it.

Everything else (the DP engine, accounting, ledger, checkpoints, EMA, model card) works on what a
family returns and never asks which family it is, like opacus' grad samplers behind their registry."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from dpdiff.families.objectives import DenoisingObjective
from dpdiff.run_files import LORA_FILE as LORA_WEIGHTS_NAME

UNCONDITIONAL_PROMPT = ""
NULL_LABEL = -1  # the "no class" key of label-conditioned families (classifier-free guidance)


class ModelFamily:
    """Base class: the SD-style defaults; a family overrides what differs."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()  # `_class_name` values in model_index.json
    denoiser_classes: tuple[str, ...] = ()  # class names of the denoiser component
    denoiser_attr: str = "unet"
    conditioning: str = "prompt"  # "prompt" or "label": what groups examples in the latent cache
    condition_keys: tuple[str, ...] = ("encoder_hidden_states",)
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    condition_embedders: tuple[str, ...] = ()  # denoiser children trained by --train_condition_embedder
    attention_block_types: tuple[str, ...] = ()  # module class names that `attention` trains
    attention_block_lists: tuple[str, ...] = ()  # or: denoiser attributes holding block lists, in depth order
    stock_lora_loader: bool = True  # the pipeline has `load_lora_weights`
    flow_matching: bool = False  # trained and sampled as a rectified flow (keeps its own sampler)

    # ---- the denoiser and its inputs -----------------------------------------------------------

    def denoiser(self, pipeline) -> nn.Module:
        return getattr(pipeline, self.denoiser_attr)

    def frozen_components(self, pipeline) -> list[nn.Module]:
        """Every model of the pipeline except the denoiser (VAE, text encoders): frozen."""
        return [m for name, m in pipeline.components.items() if isinstance(m, nn.Module) and name != self.denoiser_attr]

    def text_encoder_names(self, pipeline) -> list[str]:
        return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipeline, n, None) is not None]

    def resolution(self, pipeline) -> int:
        """Training/sampling image size in pixels: the denoiser's native latent size times the VAE factor."""
        return int(self.denoiser(pipeline).config.sample_size) * vae_scale_factor(pipeline)

    def resolution_multiple(self, pipeline) -> int:
        """Image sizes must be a multiple of this: the VAE factor times the denoiser's patch size."""
        patch = getattr(self.denoiser(pipeline).config, "patch_size", None) or 1
        return vae_scale_factor(pipeline) * int(patch)

    def train_mode(self, denoiser: nn.Module) -> None:
        """Training mode for per-example gradients (no module of the denoisers mixes examples)."""
        denoiser.train()

    def latent_channels(self, denoiser) -> int | None:
        """Channels of a cached VAE latent, to refuse a cache built with another VAE."""
        return getattr(denoiser.config, "in_channels", None)

    def training_scheduler(self, pipeline):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipeline.scheduler.config)

    def objective(self, noise_scheduler, weighting_scheme: str = "none", **options):
        if weighting_scheme != "none":
            from dpdiff.errors import ConfigError

            raise ConfigError(f"--weighting_scheme {weighting_scheme} applies to flow-matching families (SD3, Flux, Sana); "
                              f"a {self.name!r} pipeline trains with DDPM timesteps: drop it (--timestep_bias_* works for both)")
        return DenoisingObjective(noise_scheduler)

    def encode_conditions(self, pipeline, keys: list, resolution: int) -> dict[str, torch.Tensor]:
        """One row per key (a prompt, or a class label for label families; the last key is the
        unconditional one) for every name in `condition_keys`: fp32 CPU tensors."""
        raise NotImplementedError

    def predict(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditions: dict) -> torch.Tensor:
        """The denoiser's prediction, in the latent layout of `noisy`."""
        return denoiser(noisy, timesteps, encoder_hidden_states=conditions["encoder_hidden_states"]).sample

    # ---- what trains ----------------------------------------------------------------------------

    def attention_blocks(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        """The blocks `--method attention` trains from `attention_start_index` on, in depth order."""
        blocks = []
        for attr in self.attention_block_lists:
            for i, block in enumerate(getattr(denoiser, attr, None) or []):
                blocks.append((f"{attr}.{i}", block))
        return blocks

    # ---- export ---------------------------------------------------------------------------------

    def save_lora(self, denoiser: nn.Module, output_dir: Path, layers: dict, metadata: dict) -> Path:
        """Write the LoRA layers (peft key format) where the stock pipeline's loader finds them."""
        pipeline_class = self.lora_pipeline_class()
        key = f"{self.denoiser_attr}_lora_layers"
        with tempfile.TemporaryDirectory(prefix=".lora.", dir=output_dir) as tmp:
            pipeline_class.save_lora_weights(tmp, **{key: layers, f"{self.denoiser_attr}_lora_adapter_metadata": metadata},
                                             safe_serialization=True)
            os.replace(Path(tmp) / LORA_WEIGHTS_NAME, output_dir / LORA_WEIGHTS_NAME)
        return output_dir / LORA_WEIGHTS_NAME

    def load_lora(self, pipeline, run_dir: Path) -> None:
        pipeline.load_lora_weights(str(run_dir), weight_name=LORA_WEIGHTS_NAME)

    def lora_pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    # ---- sampling -------------------------------------------------------------------------------

    def generate(self, pipeline, prompts: list[str], labels: list[int], *, generator, num_inference_steps: int,
                 guidance_scale: float, resolution: int | None = None, output_type: str = "pil"):
        """Images for these prompts (or class labels) with the stock pipeline call; `generator`: one, or
        one per image; `resolution` None: the pipeline's default size."""
        size = {} if resolution is None else {"height": resolution, "width": resolution}
        return pipeline(prompt=prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generator=generator, output_type=output_type, **size).images

    def usage_call(self, prompt: str, num_inference_steps: int, guidance_scale: float) -> str:
        """The model card's sampling line."""
        return f'image = pipe("{prompt}", num_inference_steps={num_inference_steps}, guidance_scale={guidance_scale}).images[0]'

    def usage_load_lora(self, repo: str) -> str:
        """The model card's line that loads the adapter into the stock pipeline."""
        return f'pipe.load_lora_weights("{repo}")'

    def describe(self) -> dict:
        return {"family": self.name, "denoiser": self.denoiser_attr}



def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under Opacus' GradSampleModule / DPDDP / DDP / Accelerate wrappers."""
    while True:
        inner = getattr(model, "_module", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def vae_scale_factor(pipeline) -> int:
    factor = getattr(pipeline, "vae_scale_factor", None)
    return int(factor) if factor else 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


def max_sequence_length(pipeline, tokenizer) -> int:
    """The prompt length the pipeline samples with (its `max_sequence_length` default), capped by the
    tokenizer: training conditions on prompts encoded exactly as sampling will encode them."""
    import inspect

    default = inspect.signature(type(pipeline).__call__).parameters.get("max_sequence_length")
    length = default.default if default is not None and isinstance(default.default, int) else tokenizer.model_max_length
    return int(min(length, tokenizer.model_max_length))


def batched(keys: list, size: int = 64):
    for i in range(0, len(keys), size):
        yield list(keys[i : i + size])


@torch.no_grad()
def encode_masked_prompts(pipeline, keys: list, **options) -> dict[str, torch.Tensor]:
    """Hidden states + attention mask from a single-encoder pipeline's `encode_prompt` (PixArt's T5,
    Sana's Gemma), at the length the pipeline samples with; fp32 on the CPU."""
    length = max_sequence_length(pipeline, pipeline.tokenizer)
    embeds, masks = [], []
    for chunk in batched(keys):
        e, m, _, _ = pipeline.encode_prompt(chunk, do_classifier_free_guidance=False, device=pipeline.text_encoder.device,
                                            max_sequence_length=length, **options)
        embeds.append(e.float().cpu())
        masks.append(m.float().cpu())
    return {"encoder_hidden_states": torch.cat(embeds), "encoder_attention_mask": torch.cat(masks)}
