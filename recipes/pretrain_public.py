"""Pretrain the built-in tiny preset on PUBLIC data only (MNIST-5k + Animal-MNIST), non-privately.

    python recipes/pretrain_public.py --output_dir dpdiff/presets/tiny-sd

Writes a stock `StableDiffusionPipeline` folder (`save_pretrained`, safetensors) with a
`manifest.json` (command, seed, data, steps, losses, reconstruction errors) and sample grids."""

from __future__ import annotations

import argparse
import platform
import shlex
import sys

import torch

from dpdiff.data import load_source
from dpdiff.data.transforms import images_to_tensor
from dpdiff.imaging import save_grid, to_pil
from dpdiff.io import atomic_dir, write_json
from dpdiff.pipelines.preset import UNET_CONFIG, build_tiny_pipeline, unet_size_overrides
from dpdiff.training import pretrain


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="dpdiff/presets/tiny-sd")
    p.add_argument("--vae_steps", type=int, default=1000)
    p.add_argument("--unet_steps", type=int, default=3000)
    p.add_argument("--vae_batch_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--vae_learning_rate", type=float, default=1e-3)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--limit", type=int, default=None, help="images per public source (quick runs/tests)")
    p.add_argument("--eval_examples", type=int, default=1000, help="Fashion-MNIST test images for the VAE check")
    p.add_argument("--samples_grid", default=None, help="PNG of samples for each public class prompt")
    p.add_argument("--recon_grid", default=None, help="PNG: Fashion-MNIST test images (top) and VAE reconstructions")
    p.add_argument("--unet_block_out_channels", type=int, nargs="+", default=None,
                   help=f"denoiser widths per level (default {' '.join(map(str, UNET_CONFIG['block_out_channels']))})")
    p.add_argument("--unet_layers_per_block", type=int, default=None,
                   help=f"resnet+attention layers per level (default {UNET_CONFIG['layers_per_block']})")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.unet_overrides = unet_size_overrides(args.unet_block_out_channels, args.unet_layers_per_block)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    corpus = pretrain.load_public_corpus(limit=args.limit, seed=args.seed)
    class_prompts = list(dict.fromkeys(corpus.prompts))
    pipe = build_tiny_pipeline(class_prompts, seed=args.seed, **args.unet_overrides)

    with pretrain.Timer() as vae_time:
        vae_losses = pretrain.train_vae(pipe.vae, corpus.images, args.vae_steps, args.vae_batch_size, args.vae_learning_rate, seed=args.seed)
    # cache the frozen VAE's latents of the images and their mirror images
    images = torch.cat([corpus.images, corpus.images.flip(-1)])
    latents = pretrain.encode_latents(pipe.vae, images)
    scale = pretrain.set_latent_scaling(pipe.vae, latents)
    with pretrain.Timer() as unet_time:
        unet_losses = pretrain.train_denoiser(pipe, latents * scale, corpus.prompts * 2, args.unet_steps, args.batch_size, args.learning_rate, seed=args.seed)

    report = {
        "public_recon_mse": pretrain.reconstruction_mse(pipe.vae, corpus.images[: args.eval_examples]),
    }
    try:
        fashion = load_source("fashion_mnist", "test", limit=args.eval_examples, seed=args.seed)
        fashion_x = images_to_tensor(fashion.dataset["image"], 32, 3)
        report["fashion_mnist_test_recon_mse"] = pretrain.reconstruction_mse(pipe.vae, fashion_x)
        if args.recon_grid:
            with torch.no_grad():
                recon = pipe.vae.decode(pipe.vae.encode(fashion_x[:16]).latent_dist.mode()).sample
            save_grid(to_pil(torch.cat([fashion_x[:16], recon])), args.recon_grid, nrow=16, scale=3)
    except Exception as e:  # the preset is still usable without this check
        report["fashion_mnist_test_recon_mse"] = f"unavailable: {e}"

    with atomic_dir(args.output_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "manifest.json", {
            "command": "python " + shlex.join(sys.argv),
            "seed": args.seed,
            "public_data": {name: "train split" + (f", {args.limit} images" if args.limit else "") for name in corpus.sources},
            "num_images": len(corpus.images),
            "vae": {"steps": args.vae_steps, "batch_size": args.vae_batch_size, "learning_rate": args.vae_learning_rate,
                    "final_loss": pretrain.tail_mean(vae_losses), "seconds": round(vae_time.seconds, 1)},
            "unet_size": {"block_out_channels": list(pipe.unet.config.block_out_channels),
                          "layers_per_block": pipe.unet.config.layers_per_block,
                          "parameters": sum(p.numel() for p in pipe.unet.parameters())},
            "unet_and_text_encoder": {"steps": args.unet_steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                                      "final_loss": pretrain.tail_mean(unet_losses), "seconds": round(unet_time.seconds, 1)},
            "latent_scaling_factor": scale,
            "evaluation": report,
            "class_prompts": class_prompts,
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        })
    if args.samples_grid:
        from dpdiff.pipelines import load_pipeline

        loaded = load_pipeline(args.output_dir)
        prompts = [p for p in class_prompts for _ in range(8)]
        g = torch.Generator().manual_seed(args.seed)
        out = loaded(prompts, num_inference_steps=50, guidance_scale=3.0, height=32, width=32, generator=g, output_type="pil").images
        save_grid(out, args.samples_grid, nrow=8, scale=3)
    print({"vae_loss": pretrain.tail_mean(vae_losses), "unet_loss": pretrain.tail_mean(unet_losses), **report})


if __name__ == "__main__":
    main()
