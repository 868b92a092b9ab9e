"""The fine-tuning flags, shared by `recipes/finetune_*.py` and `dpdiff finetune`.

Names follow the diffusers training scripts where one exists; a YAML config (`--config`) uses the
same names."""

from __future__ import annotations

import argparse

from dpdiff.pipelines.loading import PRESET_NAME
from dpdiff.families.objectives import WEIGHTING_SCHEMES
from dpdiff.privacy.diffusion_loss import TIMESTEP_BIAS_STRATEGIES
from dpdiff.privacy.engine_checks import GRAD_SAMPLE_MODES
from dpdiff.training.diffusers_flags import add_diffusers_arguments

METHODS = ("lora", "attention", "full")


def add_finetune_arguments(parser: argparse.ArgumentParser, method: str | None = None) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--method", choices=METHODS, default=method or "lora", help="which parameters train")
    # what to train on
    a("--pretrained_model_name_or_path", default=PRESET_NAME, help="hub id, local pipeline folder, or the built-in 'dpdiff-tiny'")
    a("--dataset", default="fashion_mnist", help="fashion_mnist | mnist5k | animal_mnist | imagefolder:PATH | hub dataset id")
    a("--max_train_samples", type=int, default=None, help="a seeded subset of the private set (quick runs); n is then this size")
    a("--prompt_template", default=None, help="caption every image from its label, e.g. 'a photo of {article} {class_name}' (the default) or 'class {label}'; fields {class_name}, {article}, {label}")
    a("--skip_bad_files", action="store_true", help="skip unreadable images (reported) instead of stopping")
    a("--image_column", default=None, help="the image column of a datasets dataset (hub id or folder); default: autodetected (image, img, pixel_values)")
    a("--caption_column", default=None, help="the caption column (datasets dataset, or a key of an imagefolder's metadata.jsonl); default: autodetected (prompt, text, caption), else captions from the labels")
    a("--resolution", type=int, default=None, help="train at this square size in pixels, a positive multiple of 8 (the VAE factor); default: the base model's native size")
    a("--center_crop", action="store_true", help="center crop to a square, then resize (the diffusers flag); dpdiff always does this, since a cached latent cannot take diffusers' default random crop")
    a("--cache_dir", default=None, help="a cache root, as in diffusers: hub downloads of the base model and VAE go there, and the latent cache (VAE latents + encoded captions of the PRIVATE images, memory-mapped safetensors shards: keep it as private as the data) in CACHE_DIR/dpdiff_latent_cache (a folder that already is a latent cache is used as it is); default: the hub's cache and OUTPUT_DIR/latent_cache. Reused by --resume_from_checkpoint and by any run on the same data, base model, resolution, flip and family; refused when those differ")
    a("--encode_batch_size", type=int, default=None, help="images per VAE batch while building the latent cache; default: by pixels (8 at 512 px, 2 at 1024 px, 32 at 256 px)")
    a("--random_flip", action="store_true", help="horizontal flip augmentation: every image's mirrored latent is cached too (twice the latent memory) and a public coin picks one per step and example")
    # the guarantee
    a("--target_epsilon", type=float, default=10.0, help="the epsilon the run must not exceed; sigma is chosen to meet it")
    a("--delta", type=float, default=1e-5, help="must be < 1/n")
    a("--force_delta", action="store_true", help="allow delta >= 1/n (a weak guarantee; recorded as such)")
    a("--accountant", choices=("prv", "rdp"), default="prv", help="PRV is tight; RDP is a looser upper bound")
    a("--max_grad_norm", type=float, default=DEFAULT_MAX_GRAD_NORM, help="per-example clipping norm C; small on purpose: with Adam a C that nearly every example exceeds gave far better images (docs/recipes.md)")
    a("--noise_multiplicity", type=int, default=1, help="K (noise, timestep) draws averaged inside each example's gradient")
    a("--timestep_bias_strategy", choices=TIMESTEP_BIAS_STRATEGIES, default="none", help="draw some noise levels more often (the diffusers flags): later = the noisiest, where the class shapes form")
    a("--timestep_bias_multiplier", type=float, default=1.0, help="how much more often the biased timesteps are drawn")
    a("--timestep_bias_portion", type=float, default=0.25, help="earlier/later: the fraction of timesteps that is biased")
    a("--timestep_bias_begin", type=int, default=0, help="range: first biased timestep")
    a("--timestep_bias_end", type=int, default=None, help="range: end of the biased timesteps (exclusive; default: the last)")
    a("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="none", help="flow-matching families (SD3, Flux, Sana): how training timesteps are drawn (the diffusers flag; none = uniform)")
    a("--clipping", choices=("flat", "per_layer"), default="flat", help="one norm over all trained parameters, or an equal split per tensor")
    a("--grad_sample_mode", choices=GRAD_SAMPLE_MODES, default="auto", help="how per-example gradients are computed (same result); auto: fused (LoRA Linear A/B in closed form; plain Linear, Conv2d, LayerNorm/GroupNorm weights inside their own backward, no summed weight gradient; other trained layers, e.g. grouped convs or embeddings, on Opacus hooks; flat clipping keeps cheap Linear/conv weight gradients factored: ghost norms + one clipped-sum product) when any such layer trains, else Opacus hooks; fused_lora: the earlier name of fused")
    a("--gradient_checkpointing", action="store_true", help="recompute the denoiser's blocks in backward to save activation memory (the diffusers flag); only when every trained parameter is on the fused path (LoRA, Linear, zero-padded ungrouped Conv2d, norms: every method on the UNets), else refused")
    a("--dry_run", action="store_true", help="print the memory plan (peak device memory from the model configs: weights, trained state, per-example gradients, activations) and stop before loading any data or weights")
    a("--device_memory_gib", type=float, default=None, help="plan against this much device memory instead of the free memory now (plan a GPU run with --dry_run elsewhere, or override a refusal you know to be too cautious)")
    a("--secure_mode", action="store_true", help="draw the Poisson sampling and the Gaussian noise from the OS CSPRNG (os.urandom; Box-Muller in "
      "float64) instead of torch's generator seeded from OS entropy; flat clipping only; costs ~0.1 s per million trained "
      "parameters a step on one CPU core (docs/privacy.md)")
    # schedule
    a("--epochs", type=float, default=None, help="expected passes over the private set (default 1 unless --max_steps)")
    a("--max_steps", type=int, default=None, help="logical DP-SGD steps (overrides --epochs)")
    a("--batch_size", type=int, default=256, help="expected logical batch (Poisson sampling rate = batch_size / n)")
    a("--physical_batch_size", type=int, default=None, help="micro-batch that fits in memory; does not change the guarantee (default: min(64, --batch_size))")
    a("--learning_rate", type=float, default=None, help="default: 2e-3 lora, 5e-4 attention, 2e-4 full")
    a("--ema_decay", type=float, default=0.999, help="EMA of the trained weights (post-processing); 0 disables")
    a("--cond_dropout", type=float, default=0.1, help="probability of the empty prompt (classifier-free guidance)")
    # what trains
    a("--rank", type=int, default=8, help="LoRA rank")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (default: rank)")
    a("--lora_target_modules", nargs="+", default=None, help="module names that get LoRA adapters (default: the model family's attention projections, e.g. to_q to_k to_v to_out.0; a name matching nothing is an error)")
    a("--attention_start_index", type=int, default=0, help="attention method: train attention blocks from this index on")
    a("--train_condition_embedder", action="store_true", help="also train the denoiser's time/class/text embedding modules fully")
    # outputs
    a("--output_dir", default="dpdiff-output", help="where the adapter, privacy.json, model card and plots go")
    a("--overwrite_output_dir", action="store_true", help="replace the results of an earlier run in --output_dir")
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder of this output_dir")
    a("--checkpointing_steps", type=int, default=100, help="checkpoint (weights, optimizer, ledger, RNG) every N steps; 0: never")
    a("--checkpoints_total_limit", type=int, default=2, help="keep only the newest N checkpoints")
    a("--validation_steps", type=int, default=0, help="sample grid every N steps (0: only at the end)")
    a("--guidance_scale", type=float, default=2.0, help="classifier-free guidance of the sample grids (and the default of dpdiff sample)")
    a("--num_inference_steps", type=int, default=50, help="DDIM steps of the sample grids (and the default of dpdiff sample)")
    a("--report_to", default=None, help="Accelerate tracker (tensorboard, wandb, ...). It logs the training loss and the share of clipped examples, which are NOT noised: not covered by the guarantee, keep those logs private")
    a("--push_to_hub", action="store_true", help="upload the results with a model card (needs a token)")
    a("--hub_model_id", default=None, help="owner/name of the hub repo (default: the output folder name)")
    a("--hub_token", default=None, help="default: HF_TOKEN / the saved login; never written anywhere")
    a("--seed", type=int, default=0, help="public seed of initialisation and diffusion draws")
    a("--privacy_seed", type=int, default=None, help="seed the SECRET sampling/noise draws (tests only; default OS entropy)")
    return add_diffusers_arguments(parser)


# every example clipped on the preset (docs/benchmarks.md, per-example gradient norms): the noise is sized to C
DEFAULT_MAX_GRAD_NORM = 0.05
DEFAULT_LEARNING_RATES = {"lora": 2e-3, "attention": 5e-4, "full": 2e-4}


def finetune_args(**flags) -> argparse.Namespace:
    """`finetune(finetune_args(method="lora", target_epsilon=8, output_dir="out"))`: the recipe's flags
    from Python, checked like a YAML config; the rest keep the command line's defaults."""
    from dpdiff.config import args_from_dict

    parser = add_finetune_arguments(argparse.ArgumentParser(), method=flags.get("method"))
    return args_from_dict(parser, flags, source="finetune_args")


# flags about this process rather than the training (and the token, which is never written anywhere)
NOT_REPLAYED = frozenset({"config", "hub_token", "resume_from_checkpoint", "overwrite_output_dir", "push_to_hub", "help",
                          "dry_run", "device_memory_gib"})


def replayable_flags(args: argparse.Namespace) -> dict:
    """The fine-tuning flags of `args` under their own names, resolved defaults included (the method's learning
    rate): a `--config` file that trains again the same way. Attributes that are not flags (a CLI's subcommand)
    and NOT_REPLAYED are left out; every value is a YAML scalar or list."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value if isinstance(value, (str, int, float, bool)) else str(value)

    flags = {a.dest for a in add_finetune_arguments(argparse.ArgumentParser())._actions} - NOT_REPLAYED
    return {k: plain(v) for k, v in vars(args).items() if k in flags and v is not None}
