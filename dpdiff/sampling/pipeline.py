"""A fine-tuned run as a stock diffusers pipeline: the base model plus the run's trained weights.

LoRA runs go through the family's loader (`load_lora_weights`, exactly what a user of the hub adapter
does), attention and full runs swap in the saved denoiser. DDPM-family runs sample with the scheduler
named here (DDIM unless asked otherwise), never the one the base ships with, so `num_inference_steps`
means the same thing for every base model (an SD-1.5 base ships with PNDM); flow-matching families
(SD3, Flux, Sana) keep their pipeline's own flow scheduler."""

from __future__ import annotations

import os

import torch
import diffusers

from dpdiff.errors import ConfigError
from dpdiff.families import family_for_pipeline
from dpdiff.pipelines.loading import load_pipeline
from dpdiff.sampling import SCHEDULERS, check_scheduler
from dpdiff.sampling.records import RunRecord, read_run, resolve_run

DEFAULT_SCHEDULER = "ddim"

# a swapped-in denoiser must fit the base's VAE latents and text encoder(s)
UNET_INTERFACE = ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "caption_channels",
                  "joint_attention_dim", "pooled_projection_dim", "num_embeds_ada_norm")


def load_finetuned_pipeline(
    run_dir_or_hub_id: str | os.PathLike,
    base_model: str | None = None,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    scheduler: str = DEFAULT_SCHEDULER,
):
    """Base pipeline (hub id, folder or 'dpdiff-tiny') + the run's adapter or UNet, on `device`.

    `base_model` overrides the one recorded in generation_config.json (e.g. a local copy of it);
    `scheduler`: a key of SCHEDULERS."""
    run = read_run(resolve_run(run_dir_or_hub_id))
    return pipeline_for_run(run, base_model=base_model, device=device, torch_dtype=torch_dtype, scheduler=scheduler)


def pipeline_for_run(run: RunRecord, base_model: str | None = None, device="cpu", torch_dtype=torch.float32,
                     scheduler: str = DEFAULT_SCHEDULER):
    check_scheduler(scheduler)
    if run.method == "mepf":
        raise ConfigError(f"{run.path} is a DP-MEPF run: it has a generator, not a diffusion pipeline; use sample_dataset / `dpdiff sample`")
    base = base_model or run.generation["base_model"]
    try:
        pipe = load_pipeline(base, torch_dtype=torch_dtype)
    except ConfigError as e:
        raise ConfigError(f"{e} (base model of the run {run.path}; pass --base_model to point at a copy of it)") from e
    family = family_for_pipeline(pipe)
    if run.method == "lora":
        family.load_lora(pipe, run.path)
    else:
        folder = run.path / family.denoiser_attr
        if not folder.is_dir():
            raise ConfigError(f"{run.path} has no {family.denoiser_attr}/ folder, which a {run.method} run of a "
                              f"{family.name!r} pipeline ({base!r}) leaves; pass the --base_model the run was trained from")
        base_denoiser = family.denoiser(pipe)
        denoiser = type(base_denoiser).from_pretrained(folder, dtype=torch_dtype, use_safetensors=True)
        check_unet_fits(base_denoiser, denoiser, base, run)
        pipe.register_modules(**{family.denoiser_attr: denoiser})
    if family.flow_matching:  # the DDPM samplers do not apply; the pipeline's own flow scheduler does
        if scheduler != DEFAULT_SCHEDULER:
            raise ConfigError(f"{base!r} is a flow-matching ({family.name}) pipeline: it samples with its own "
                              f"{type(pipe.scheduler).__name__}; drop --scheduler {scheduler}")
    else:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)  # sample_dataset shows one bar over all images
    return pipe.to(device)


def check_unet_fits(base_unet, unet, base: str, run: RunRecord) -> None:
    wrong = {k: (base_unet.config.get(k), unet.config.get(k)) for k in UNET_INTERFACE if base_unet.config.get(k) != unet.config.get(k)}
    if wrong:
        raise ConfigError(
            f"the {type(unet).__name__} of {run.path} does not fit the base model {base!r} (base vs run: {wrong}); "
            "pass the --base_model the run was trained from"
        )
