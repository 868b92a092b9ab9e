"""diffusers' training-script flag names, accepted as they are (`train_text_to_image_lora.py`,
`train_dreambooth_lora_sdxl.py`): the one table that maps them onto dpdiff's flags.

A diffusers user's command runs unchanged on `recipes/finetune_*.py`, `dpdiff finetune` and in a YAML
config. Each name is one of:

- an alias (`--max_train_steps` -> `--max_steps`): it keeps its own name on the command line and in the
  YAML, and `resolve` moves its value onto dpdiff's flag (both given with different values: an error);
- a flag with a DP meaning, said in `--help` (`--train_batch_size` is the Poisson EXPECTED batch;
  `--gradient_accumulation_steps` splits it into physical micro-batches);
- a run setting dpdiff now has under the same name (`--validation_prompt`, `--lr_scheduler`, ...:
  dpdiff/training/diffusers_run.py applies those);
- refused, with one line saying why and what to use (`REFUSED`).

An unknown flag gets one line naming the closest known one, or why a diffusers flag is refused
(`dpdiff.config.unknown_flag_message`, which reads the parser's `refused_flags`). The table in
docs/recipes.md lists every name; a test keeps the two the same."""

from __future__ import annotations

import argparse
import math
import os

from dpdiff.errors import ConfigError

# alias -> (dpdiff dest, how the value maps); one line each in `--help` and docs/recipes.md
ALIASES = {
    "train_data_dir": ("dataset", lambda v: f"imagefolder:{v}"),
    "dataset_name": ("dataset", str),
    "instance_data_dir": ("dataset", lambda v: f"imagefolder:{v}"),
    "max_train_steps": ("max_steps", int),
    "num_train_epochs": ("epochs", float),
    "train_batch_size": ("batch_size", int),
}
DEFAULT_PHYSICAL_BATCH = 64
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEFAULT_VALIDATION_IMAGES = 4  # diffusers' default per prompt

# diffusers flag -> why dpdiff refuses it, and what to use instead (one line)
REFUSED = {
    "train_text_encoder": "the text encoders run once, frozen, into the latent cache, outside the DP step; training "
                          "them would need them inside it (per-example gradients through every encoder); leave it out: "
                          "the denoiser's LoRA (or --method attention) trains",
    "with_prior_preservation": "prior preservation trains on generated class images beside the private ones (a second "
                               "loss the DP step does not bound); leave it out: only the private images train",
    "dataset_config_name": "dpdiff reads a dataset's default configuration; save the one you want with "
                           "`datasets.load_dataset(NAME, CONFIG).save_to_disk(DIR)` and pass --dataset_name DIR",
    "use_8bit_adam": "the DP optimizer wraps torch's AdamW with fp32 state (the adapters are small); leave it out",
    "enable_xformers_memory_efficient_attention": "per-example gradients run through PyTorch's own attention "
                                                  "(scaled_dot_product_attention, already memory-efficient); leave it out",
    "scale_lr": "under DP the batch is set by the sampling rate the accountant uses, not by processes x accumulation; "
                "set --learning_rate itself",
    "adam_weight_decay": "dpdiff uses AdamW with weight decay 0 (default betas and epsilon); leave it out",
    "adam_beta1": "dpdiff uses AdamW with torch's default betas (0.9, 0.999); leave it out",
    "adam_beta2": "dpdiff uses AdamW with torch's default betas (0.9, 0.999); leave it out",
    "adam_epsilon": "dpdiff uses AdamW with torch's default epsilon 1e-8; leave it out",
    "prediction_type": "the base pipeline's scheduler decides what the denoiser predicts; leave it out",
    "use_dora": "DoRA's magnitude vector has no per-example gradient on dpdiff's fused path; leave it out (LoRA trains)",
}
for _name in ("class_data_dir", "class_prompt", "num_class_images", "prior_loss_weight"):
    REFUSED[_name] = "prior-preservation data: " + REFUSED["with_prior_preservation"]


def add_diffusers_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """diffusers' names in their own `--help` group; the refused ones are named in the epilog."""
    g = parser.add_argument_group("diffusers' flag names (train_text_to_image_lora.py, train_dreambooth_lora*.py); "
                                  "docs/recipes.md maps every one")
    a = g.add_argument
    a("--train_data_dir", default=None, help="= --dataset imagefolder:DIR (sub-folders are classes; a metadata.jsonl gives captions)")
    a("--dataset_name", default=None, help="= --dataset NAME: a hub dataset id, a folder `datasets.load_dataset` reads, or a save_to_disk folder")
    a("--instance_data_dir", default=None, help="DreamBooth: a folder of images, all captioned with --instance_prompt. DP protects each "
      "IMAGE: a subject shown in all k images is protected only as a group (about k x epsilon)")
    a("--instance_prompt", default=None, help="DreamBooth: the caption of every image of --instance_data_dir (public text you typed)")
    a("--max_train_steps", type=int, default=None, help="= --max_steps: logical DP-SGD steps (sigma is chosen for this many)")
    a("--num_train_epochs", type=float, default=None, help="= --epochs: EXPECTED passes over the private set (Poisson sampling)")
    a("--train_batch_size", type=int, default=None, help="= --batch_size: the Poisson EXPECTED logical batch (each example joins a "
      "step with probability batch/n; the size varies). Unlike diffusers, it is not per device and not multiplied by "
      "--gradient_accumulation_steps: it is the batch the accountant uses")
    a("--gradient_accumulation_steps", type=int, default=None, help="physical micro-batching: each logical (DP) batch runs in about "
      "this many micro-batches (--physical_batch_size = ceil(batch / steps)); one clip-and-noise step per logical batch, "
      "so it changes memory, not the guarantee")
    a("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Accelerate's precision (default: `accelerate launch "
      "--mixed_precision`, else no): frozen weights in bf16/fp16, trained ones, clipping and noise in fp32. fp16 needs a "
      "CUDA GPU (refused on a CPU)")
    a("--validation_prompt", nargs="+", default=None, help="prompt(s) of the sample grid drawn during and after training, of "
      "the model card's snippet and widget (public text: you typed it). Default: the class prompts; a captions-only set "
      "gets the empty prompt (trained by --cond_dropout), never a caption")
    a("--num_validation_images", type=int, default=None, help=f"images per validation prompt in the grid (default {DEFAULT_VALIDATION_IMAGES})")
    a("--validation_epochs", type=float, default=None, help="a sample grid every this many expected epochs (= --validation_steps "
      "epochs x n / batch)")
    a("--lr_scheduler", choices=LR_SCHEDULERS, default="constant", help="diffusers' learning-rate schedules over the logical DP steps; post-processing of the noisy gradients: no privacy cost")
    a("--lr_warmup_steps", type=int, default=0, help="warmup steps of --lr_scheduler (diffusers' default is 500; dpdiff's is 0: "
      "DP runs are often shorter than that)")
    a("--snr_gamma", type=float, default=None, help="Min-SNR-gamma, as TIMESTEP SAMPLING weights min(SNR, gamma)/SNR (v-prediction: "
      "/(SNR+1)): a loss weight would be undone by per-example clipping; DDPM-style families only")
    a("--noise_offset", type=float, default=0.0, help="offset noise: noise + offset * N(0, 1) per (example, channel); public "
      "randomness keyed like the other draws; DDPM-style families only")
    a("--revision", default=None, help="hub revision of --pretrained_model_name_or_path (and of the VAE)")
    a("--variant", default=None, help="weights variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
    a("--pretrained_vae_model_name_or_path", default=None, help="another (public) VAE, e.g. madebyollin/sdxl-vae-fp16-fix; "
      "it encodes the latent cache and decodes the grids; recorded in generation_config.json and the card's snippet")
    a("--logging_dir", default="logs", help="tracker logs (--report_to), under --output_dir; never uploaded: they hold the "
      "un-noised loss")
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs (clipping, noise and the step stay fp32)")
    a("--dataloader_num_workers", type=int, default=None, help="accepted, no effect: images are read once into the latent "
      "cache (--encode_batch_size sets that pass), and training reads cached latents in the main process")
    parser.epilog = ((parser.epilog + "\n\n") if parser.epilog else "") + (
        "diffusers flags refused (one line each says why): " + ", ".join(f"--{n}" for n in REFUSED))
    parser.refused_flags = REFUSED
    return parser


def _defaults() -> dict:
    from dpdiff.training.arguments import add_finetune_arguments

    parser = add_finetune_arguments(argparse.ArgumentParser())
    return {a.dest: a.default for a in parser._actions}


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Move diffusers' names onto dpdiff's flags, in place: pure, no file or model touched. An alias whose
    dpdiff flag was also set to another value (not its default) is an error naming both."""
    defaults = _defaults()
    claimed: dict[str, str] = {}
    for alias, (dest, convert) in ALIASES.items():
        value = getattr(args, alias, None)
        if value is None:
            continue
        mapped = convert(value)
        if dest in claimed:
            raise ConfigError(f"--{alias} and --{claimed[dest]} both set --{dest}; pass one")
        current = getattr(args, dest, defaults.get(dest))
        if current not in (defaults.get(dest), mapped):
            raise ConfigError(f"--{alias} {value} and --{dest} {current} set the same thing to different values; pass one")
        setattr(args, dest, mapped)
        setattr(args, alias, None)  # the run records (training_config.yaml) hold dpdiff's names only
        claimed[dest] = alias
    _instance(args, claimed)
    _physical_batch(args)
    _precision(args)
    if getattr(args, "allow_tf32", False):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for name in ("num_validation_images", "gradient_accumulation_steps", "lr_warmup_steps"):
        value = getattr(args, name, None)
        if value is not None and (isinstance(value, bool) or value < (0 if name == "lr_warmup_steps" else 1)):
            raise ConfigError(f"--{name} must be a {'non-negative' if name == 'lr_warmup_steps' else 'positive'} integer, got {value}")
    epochs = getattr(args, "validation_epochs", None)
    if epochs is not None:
        if not (math.isfinite(epochs) and epochs > 0):
            raise ConfigError(f"--validation_epochs must be positive, got {epochs}")
        if getattr(args, "validation_steps", 0):
            raise ConfigError("--validation_epochs and --validation_steps both set when grids are drawn; pass one")
    prompts = getattr(args, "validation_prompt", None)
    if prompts is not None and (not prompts or any(not isinstance(p, str) for p in prompts)):
        raise ConfigError(f"--validation_prompt must be one or more prompts, got {prompts!r}")
    gamma, offset = getattr(args, "snr_gamma", None), getattr(args, "noise_offset", 0.0)
    if gamma is not None and not (math.isfinite(gamma) and gamma > 0):
        raise ConfigError(f"--snr_gamma must be positive (diffusers recommends 5.0), got {gamma}")
    if offset is not None and not (math.isfinite(offset) and offset >= 0):
        raise ConfigError(f"--noise_offset must be a non-negative number, got {offset}")
    return args


def _instance(args, claimed) -> None:
    """DreamBooth: every image of --instance_data_dir captioned with --instance_prompt (a fixed template)."""
    prompt = getattr(args, "instance_prompt", None)
    if claimed.get("dataset") == "instance_data_dir":
        if not prompt and getattr(args, "prompt_template", None) is None:
            raise ConfigError("--instance_data_dir needs --instance_prompt (the caption of every image, e.g. 'a photo of sks dog')")
    elif prompt is not None:
        raise ConfigError("--instance_prompt captions the images of --instance_data_dir; pass that too (or --prompt_template)")
    if prompt is not None:
        if getattr(args, "prompt_template", None) is not None:
            raise ConfigError("--instance_prompt and --prompt_template both caption every image; pass one")
        args.prompt_template = prompt.replace("{", "{{").replace("}", "}}")  # a fixed caption, no fields
        args.instance_prompt = None


def _physical_batch(args) -> None:
    """--gradient_accumulation_steps -> --physical_batch_size; left out, the physical batch is
    min(64, batch): a small --batch_size clamps it, an explicit larger one stays an error (check_arguments)."""
    steps = getattr(args, "gradient_accumulation_steps", None)
    batch = args.batch_size
    if steps is not None and isinstance(batch, int) and batch > 0 and steps > 0:
        physical = math.ceil(batch / steps)
        if args.physical_batch_size not in (None, physical):
            raise ConfigError(f"--gradient_accumulation_steps {steps} (micro-batches of {physical}) and --physical_batch_size "
                              f"{args.physical_batch_size} both set the micro-batch; pass one")
        args.physical_batch_size = physical
        args.gradient_accumulation_steps = None
    if args.physical_batch_size is None:
        args.physical_batch_size = min(DEFAULT_PHYSICAL_BATCH, batch) if isinstance(batch, int) and batch > 0 else DEFAULT_PHYSICAL_BATCH


def _precision(args) -> None:
    import torch

    precision = getattr(args, "mixed_precision", None) or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed_precision fp16 needs a CUDA GPU: on a CPU there is no fp16 speed-up, only overflow; "
                          "use --mixed_precision bf16 (or no)")
