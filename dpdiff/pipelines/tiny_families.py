"""Tiny random-weight pipelines of the main diffusers model families, built offline.

Each builder returns the STOCK diffusers pipeline class of its family (StableDiffusionPipeline,
StableDiffusionXLPipeline, PixArtAlphaPipeline, ...) whose components have the real checkpoints'
classes and config *structure* (prediction type, learned sigma, VAE shift/scale, scheduler) but
hidden sizes of 8-64 and 1-2 layers, in fp32. They exist to exercise training, saving and LoRA loading
code on every family without a hub.

Sizes are the real ones where they shape the code paths: the VAE downsampling factor (8, four VAE blocks;
Sana's deep-compression autoencoder 32, six blocks) and each checkpoint's default sample size, so that a
run at the native resolution (512 px SD-1.5 and PixArt-alpha, 768 px SD-2 v, 1024 px SDXL, PixArt-Sigma,
SD3, Flux and Sana, 256 px DiT) meets the latent sizes, token counts and memory of the real family. Only
the channel widths are tiny (the VAE mid-block attention is left out: at 128x128 latents it would
dominate the tests' time without exercising anything dpdiff does)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from dpdiff.pipelines.preset import SCHEDULER_CONFIG, build_tiny_pipeline, build_tiny_unet
from dpdiff.pipelines.tiny_text_encoders import (
    TOKENIZER_CORPUS,
    build_clip_text_encoder,
    build_clip_tokenizer,
    build_gemma2_encoder,
    build_gemma_tokenizer,
    build_t5_encoder,
    build_t5_tokenizer,
)

FAMILY_BUILDS = ("sd15", "sd2", "sdxl", "pixart_alpha", "pixart_sigma", "sd3", "flux", "sana", "dit")

VAE_FACTOR = 8  # the SD/SDXL/SD3/Flux/PixArt/DiT VAEs: four blocks, three downsamplings
# default sample sizes of the real checkpoints, in latent pixels (x8 = the native resolution in px)
LATENT_SIZES = {"sd15": 64, "sd2": 96, "sdxl": 128, "pixart_alpha": 64, "pixart_sigma": 128, "sd3": 128, "flux": 128,
                "dit": 32}
SANA_LATENT_SIZE = 32  # x32 (the DC autoencoder) = 1024 px
NATIVE_RESOLUTIONS = {**{name: size * VAE_FACTOR for name, size in LATENT_SIZES.items()}, "sana": SANA_LATENT_SIZE * 32}

# a four-block KL VAE (factor 8) with tiny widths
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(4, 8, 8, 8),  # 4 channels at full resolution: 1024-px images cost ~0.3 s each
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    mid_block_add_attention=False,
)

# The 10 CIFAR-10 names label the tiny DiT's first 10 of its 1000 classes (DiTPipeline uses 1000 as the null class).
DIT_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# noise schedules of the real checkpoints
_PIXART_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def _vae(latent_channels: int = 4, sample_size: int = 512, **overrides) -> AutoencoderKL:
    return AutoencoderKL(**{**TINY_VAE_CONFIG, "latent_channels": latent_channels, "sample_size": sample_size, **overrides})


def _flow_vae(latent_channels: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """The SD3/Flux VAE layout: 16 latent channels, a shift factor, no quant convs (1024 px)."""
    return _vae(latent_channels, sample_size=1024, scaling_factor=scaling_factor, shift_factor=shift_factor,
                use_quant_conv=False, use_post_quant_conv=False)


def _sd(seed: int, v_prediction: bool) -> StableDiffusionPipeline:
    """SD-1.5 (epsilon) or SD-2 (v-prediction, linear-projection transformers): the dpdiff preset's shapes."""
    overrides = {"use_linear_projection": True} if v_prediction else {}
    base = build_tiny_pipeline(TOKENIZER_CORPUS, seed, **overrides)
    scheduler = DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": "v_prediction" if v_prediction else "epsilon",
                                  "steps_offset": 1})
    size = LATENT_SIZES["sd2" if v_prediction else "sd15"]
    torch.manual_seed(seed)
    vae = _vae(sample_size=size * VAE_FACTOR)
    # cross-attention at the lower level only (the real UNets also attend at the top, 4096-9216 tokens: minutes per test here)
    unet = build_tiny_unet(seed, **overrides, sample_size=size, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return StableDiffusionPipeline(**{**base.components, "vae": vae, "unet": unet, "scheduler": scheduler},
                                   requires_safety_checker=False)


def _sdxl() -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer()
    text_encoder = build_clip_text_encoder(tokenizer, hidden_size=32)
    text_encoder_2 = build_clip_text_encoder(tokenizer_2, hidden_size=32, projection_dim=32, with_projection=True,
                                             hidden_act="gelu")
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZES["sdxl"],
        in_channels=4,
        out_channels=4,
        # three levels, cross-attention (two transformer layers, like SDXL's deepest) at 32x32 of the 128x128 latents
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        use_linear_projection=True,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # 6 micro-conditions (original size, crop top-left, target size) + the pooled text_encoder_2 embedding
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "clip_sample"},
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_vae(sample_size=1024, force_upcast=False, scaling_factor=0.13025), text_encoder=text_encoder,
                                     text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)


def _pixart(sigma: bool):
    """PixArt-alpha (512px layout, T5 length 120 -> 16 here) or PixArt-Sigma (length 300 -> 32 here).

    Learned sigma: out_channels = 2 * in_channels; the pipelines keep the first half (the epsilon)."""
    tokenizer = build_t5_tokenizer(model_max_length=32 if sigma else 16)
    text_encoder = build_t5_encoder(tokenizer, d_model=32)
    transformer = PixArtTransformer2DModel(
        sample_size=LATENT_SIZES["pixart_sigma" if sigma else "pixart_alpha"],
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=text_encoder.config.d_model,
        # The 1024px alpha checkpoint sets True, but the stock pipeline only feeds resolution/aspect-ratio when
        # sample_size == 128 (1024 px); with any other size True crashes the pipeline, so False (= the 512px alpha).
        use_additional_conditions=False,
        interpolation_scale=2 if sigma else None,  # None: the 512-px alpha's own (sample_size // 64 = 1)
        norm_num_groups=8,
    )
    scheduler = DPMSolverMultistepScheduler(**_PIXART_BETAS, prediction_type="epsilon")
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    # alpha uses the SD VAE, Sigma the SDXL VAE (same architecture, another scaling factor)
    return cls(tokenizer=tokenizer, text_encoder=text_encoder,
               vae=_vae(sample_size=1024 if sigma else 512, scaling_factor=0.13025 if sigma else 0.18215),
               transformer=transformer, scheduler=scheduler)


def _sd3() -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer()
    text_encoder = build_clip_text_encoder(tokenizer, hidden_size=32, projection_dim=32, with_projection=True)
    text_encoder_2 = build_clip_text_encoder(tokenizer_2, hidden_size=32, projection_dim=32, with_projection=True,
                                             hidden_act="gelu")
    tokenizer_3 = build_t5_tokenizer(model_max_length=32)
    # the CLIP hidden states (32 + 32) are zero-padded to the T5 width, then concatenated along the sequence
    text_encoder_3 = build_t5_encoder(tokenizer_3, d_model=64)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZES["sd3"],
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=32,  # = num_attention_heads * attention_head_dim
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=96,  # the real SD3's is 192 (96 patches of 2 = 1536 px)
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_flow_vae(16, scaling_factor=1.5305, shift_factor=0.0609), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def _flux() -> FluxPipeline:
    tokenizer = build_clip_tokenizer()
    text_encoder = build_clip_text_encoder(tokenizer, hidden_size=32)  # pooler_output -> pooled_projections
    tokenizer_2 = build_t5_tokenizer(model_max_length=32)
    text_encoder_2 = build_t5_encoder(tokenizer_2, d_model=32)
    latent_channels = 16
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2x2 latent patches are packed into tokens by the pipeline
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=True,  # like FLUX.1-dev
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=_flow_vae(latent_channels, scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def _sana() -> SanaPipeline:
    tokenizer = build_gemma_tokenizer(model_max_length=32)
    text_encoder = build_gemma2_encoder(tokenizer, hidden_size=32)
    latent_channels = 8
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=8,
        # six blocks, five downsamplings: the real DC-AE f32 factor (1024 px <-> 32x32 latents)
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        encoder_block_out_channels=(8, 8, 8, 16, 16, 16),
        decoder_block_out_channels=(8, 8, 8, 16, 16, 16),
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    transformer = SanaTransformer2DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,  # = num_attention_heads * attention_head_dim
        caption_channels=text_encoder.config.hidden_size,
        sample_size=SANA_LATENT_SIZE,
        patch_size=1,
    )
    # the real Sana config: flow-matching DPM-Solver++ with flow sigmas, shift 3
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0, algorithm_type="dpmsolver++",
                                            solver_order=2, beta_schedule="linear")
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


def _dit() -> DiTPipeline:
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # learned sigma: the pipeline keeps the first 4 channels
        num_layers=2,
        sample_size=LATENT_SIZES["dit"],
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline's classifier-free guidance uses class id 1000 as the null class
        norm_num_groups=8,
    )
    id2label = {i: name for i, name in enumerate(DIT_LABELS)}
    scheduler = DDIMScheduler(**_PIXART_BETAS, clip_sample=False, prediction_type="epsilon")
    pipe = DiTPipeline(transformer=transformer, vae=_vae(sample_size=256, scaling_factor=0.18215), scheduler=scheduler,
                       id2label=id2label)
    # like the real model_index.json: saved with the pipeline, handed back to __init__ by from_pretrained
    pipe.register_to_config(id2label={str(k): v for k, v in id2label.items()})
    return pipe


def build_tiny_family_pipeline(name: str, seed: int = 0) -> DiffusionPipeline:
    """A tiny random-weight fp32 pipeline of family `name` (one of FAMILY_BUILDS), deterministic in `seed`."""
    if name not in FAMILY_BUILDS:
        raise ValueError(f"unknown tiny family {name!r}: choose one of {', '.join(FAMILY_BUILDS)}")
    if name in ("sd15", "sd2"):
        pipe = _sd(seed, v_prediction=name == "sd2")
    else:
        torch.manual_seed(seed)
        builders = {"sdxl": _sdxl, "pixart_alpha": lambda: _pixart(False), "pixart_sigma": lambda: _pixart(True),
                    "sd3": _sd3, "flux": _flux, "sana": _sana, "dit": _dit}
        pipe = builders[name]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained returns them (T5 dropout, DiT label dropout are train-only)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_family_pipeline(name: str, path, seed: int = 0) -> Path:
    """Build the tiny `name` pipeline and save it (safetensors) to `path`; returns the folder."""
    path = Path(path)
    build_tiny_family_pipeline(name, seed).save_pretrained(path, safe_serialization=True)
    return path
