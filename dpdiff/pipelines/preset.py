"""The tiny Stable-Diffusion-format preset: small enough to train and fine-tune on a laptop CPU.

32x32 RGB images <-> 8x8x4 latents (AutoencoderKL), a cross-attention UNet2DConditionModel, a
small CLIPTextModel and a byte-level CLIP tokenizer. The same component classes as SD-1.5, so
everything dpdiff does here is what it does on a real pipeline."""

from __future__ import annotations

import math

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dpdiff.pipelines.tokenizer import build_tokenizer

IMAGE_SIZE = 32
LATENT_SIZE = 8
TEXT_DIM = 64

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)

TEXT_CONFIG = dict(
    hidden_size=TEXT_DIM,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=TEXT_DIM,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="epsilon",
)


def unet_size_overrides(block_out_channels: tuple[int, ...] | None = None, layers_per_block: int | None = None) -> dict:
    """UNet config overrides for a wider/deeper preset, checked before any work starts.

    Each width must be a multiple of the GroupNorm groups and the attention heads; one cross-attention
    down/up block per width (latents are 8x8, so at most 4 levels)."""
    overrides: dict = {}
    if block_out_channels is not None:
        widths = tuple(int(c) for c in block_out_channels)
        step = math.lcm(UNET_CONFIG["norm_num_groups"], UNET_CONFIG["attention_head_dim"])
        if not 2 <= len(widths) <= 4 or any(c <= 0 or c % step for c in widths):
            raise ValueError(f"--unet_block_out_channels {list(widths)}: give 2 to 4 widths, each a positive multiple of {step} "
                             f"(GroupNorm groups and attention heads), e.g. 64 128")
        overrides.update(block_out_channels=widths, down_block_types=("CrossAttnDownBlock2D",) * len(widths),
                         up_block_types=("CrossAttnUpBlock2D",) * len(widths))
    if layers_per_block is not None:
        if layers_per_block < 1:
            raise ValueError(f"--unet_layers_per_block {layers_per_block}: must be at least 1")
        overrides["layers_per_block"] = int(layers_per_block)
    return overrides


def build_tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """A randomly initialised preset-shaped UNet (tests, benchmarks, pretraining start)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def build_tiny_pipeline(prompt_corpus: list[str], seed: int = 0, **unet_overrides) -> StableDiffusionPipeline:
    """A randomly initialised preset pipeline; its tokenizer's merges come from `prompt_corpus`.

    `unet_overrides` (see `unet_size_overrides`) change only the denoiser's size, never the VAE or text encoder."""
    tokenizer: CLIPTokenizer = build_tokenizer(prompt_corpus)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_config = CLIPTextConfig(
        **TEXT_CONFIG,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = build_tiny_unet(seed, **unet_overrides)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def training_scheduler(pipeline) -> DDPMScheduler:
    """DDPM with the pipeline's own noise schedule: the one used to train every denoiser."""
    return DDPMScheduler.from_config(pipeline.scheduler.config)
