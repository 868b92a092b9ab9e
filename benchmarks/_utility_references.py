"""The reference rows of benchmarks/utility.py, which carry no guarantee: the private images themselves
(`real`), the same images through the base pipeline's VAE (`vae_reconstruction`), and the LoRA fine-tune
WITHOUT DP (`nonprivate_lora`): what each ceiling is, and what DP costs."""

from __future__ import annotations

from pathlib import Path

import torch

from _utility_report import CHANNELS, DATASET, RESOLUTION
from _utility_scoring import resolve_device

from dpdiff.data import load_source
from dpdiff.data.transforms import images_to_tensor
from dpdiff.io import write_json


def train_nonprivate_lora(args, out: Path):
    """The non-private reference, built from the library parts WITHOUT the DP engine: shuffled
    mini-batches, no clipping, no noise, the same schedule/learning rate/EMA/timestep draws as the DP
    LoRA run (K = 1: without clipping, K draws per example are just a larger batch).
    It has no privacy guarantee, so it writes no privacy.json and can never be sampled or published
    as a DP run; its samples come straight from the in-memory pipeline."""
    from diffusers.training_utils import EMAModel

    from dpdiff.adapters import prepare_trainable
    from dpdiff.pipelines import load_pipeline
    from dpdiff.pipelines.preset import training_scheduler
    from dpdiff.privacy.accounting import steps_for
    from dpdiff.privacy.diffusion_loss import draw_diffusion_inputs, example_generator, per_row_loss, timestep_weights
    from dpdiff.training.arguments import DEFAULT_LEARNING_RATES
    from dpdiff.training.latent_cache import build_latent_cache
    from torch.utils.data import default_collate
    from tqdm.auto import tqdm

    device = resolve_device(args)
    source = load_source(DATASET, "train", limit=args.max_train_samples, seed=args.seed, prompt_template=args.prompt_template)
    pipe = load_pipeline(args.base_model).to(device)
    unet = pipe.unet.train()
    prepare_trainable(unet, "lora", rank=args.rank, target_modules=args.lora_target_modules)
    cache = build_latent_cache(pipe, source, unet.config.sample_size * pipe.vae_scale_factor, cond_dropout=0.1, seed=args.seed)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate or DEFAULT_LEARNING_RATES["lora"], weight_decay=0.0)
    ema, scheduler = EMAModel(params, decay=0.999), training_scheduler(pipe)
    num_timesteps = scheduler.config.num_train_timesteps
    weights = timestep_weights(num_timesteps, args.timestep_bias_strategy, args.timestep_bias_multiplier, args.timestep_bias_portion)
    n, batch = len(cache), min(args.batch_size, len(cache))
    steps = steps_for(batch / n, epochs=None if args.max_steps else args.epochs, max_steps=args.max_steps)  # as DP-SGD
    order, generator = torch.empty(0, dtype=torch.long), torch.Generator().manual_seed(args.seed)
    for step in tqdm(range(steps), desc="non-private lora"):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:batch].tolist(), order[batch:]
        cache.step = step
        batch_items = default_collate([cache[i] for i in idx])
        latents, hidden = batch_items["latents"].to(device), batch_items["encoder_hidden_states"].to(device)
        gens = [example_generator(args.seed, step, i) for i in idx]
        rows, noise, t = draw_diffusion_inputs(latents, 1, num_timesteps, gens, weights)  # the DP runs' timestep draws
        loss = per_row_loss(unet, scheduler, rows, hidden, noise, t).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(params)
    ema.copy_to(params)
    unet.eval()
    write_json(out / "reference.json", {"private": False, "guarantee": None, "steps": steps, "batch_size": batch,
                                        "note": "non-private reference: no clipping, no noise, no DP guarantee"})
    return pipe, source


def reference_images(args):
    """The private images the `real` and `vae_reconstruction` references train on: up to --num_per_class
    of each class (seeded), as many as each synthetic set has, so a reference is the ceiling AT THAT SIZE
    (real Fashion-MNIST: CNN 83% from 300 per class, 91% from all 6,000)."""
    train = load_source(DATASET, "train", limit=args.max_train_samples, seed=args.seed).dataset
    labels, generator = torch.tensor(train["label"]), torch.Generator().manual_seed(args.seed)
    keep = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        keep += members[torch.randperm(len(members), generator=generator)[: args.num_per_class]].tolist()
    return train.select(sorted(keep))


@torch.no_grad()
def vae_reconstructions(args) -> tuple[torch.Tensor, torch.Tensor]:
    """The `real` reference's images through the base pipeline's frozen VAE and
    back, at the resolution the UNet trains on (posterior mode, as the latent cache encodes them), then
    in the private format: the best any method that generates through this autoencoder can score."""
    from dpdiff.data.transforms import tensor_to_images
    from dpdiff.pipelines import load_pipeline
    from dpdiff.training.latent_cache import encode_images

    pipe = load_pipeline(args.base_model).to(resolve_device(args))
    vae, resolution = pipe.vae, pipe.unet.config.sample_size * pipe.vae_scale_factor
    train = reference_images(args)
    latents, images = encode_images(vae, train["image"], resolution), []
    for chunk in latents.split(256):
        decoded = vae.decode(chunk.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        images.append(images_to_tensor(tensor_to_images(decoded, CHANNELS, RESOLUTION), RESOLUTION, CHANNELS))
    return torch.cat(images), torch.tensor(train["label"])


def sample_nonprivate(args, pipe, source, synthetic: Path) -> None:
    from diffusers import DDIMScheduler

    from dpdiff.sampling.generate import convert, encode_png, generate, plan_requests, write_imagefolder

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    requests, _ = plan_requests(source.class_prompts, args.num_per_class, None, 1, args.seed)
    pngs = [encode_png(convert(im, CHANNELS, RESOLUTION))
            for im in generate(pipe, requests, args.guidance_scale, args.inference_steps, batch_size=50)]
    write_imagefolder(synthetic, pngs, [r.label for r in requests], [r.prompt for r in requests])
    write_json(synthetic / "class_names.json", list(source.class_names))
