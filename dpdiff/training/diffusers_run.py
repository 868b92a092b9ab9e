"""What diffusers' run settings do inside a dpdiff run (the names: dpdiff/training/diffusers_flags.py).

Each function is one hook of the training loop, so loop.py stays a list of steps: the Accelerator's
settings, the pipeline's hub arguments, where the latent cache lives under `--cache_dir`, the plan
printed (and a warning when the noise swamps the signal) before training, the learning-rate schedule,
Min-SNR and offset noise as public draws, the sample grid's prompts, and DreamBooth's flat folder."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from dpdiff.data.image_source import CAPTION_ONLY_CLASS, ImageSource, build_file_dataset, prompt_for, subsample
from dpdiff.errors import ConfigError, DataError
from dpdiff.families.base import UNCONDITIONAL_PROMPT
from dpdiff.training.diffusers_flags import DEFAULT_VALIDATION_IMAGES

logger = logging.getLogger(__name__)
LATENT_CACHE_SUBDIR = "dpdiff_latent_cache"
# sigma * C / B (the noise std on each coordinate of the averaged update) above this share of C, the
# largest norm the whole averaged signal can have: the update is noise (issue 40: sigma 563 ran silently)
NOISE_SWAMPS = 0.1


def accelerator_kwargs(args, output_dir: Path) -> dict:
    """`Accelerator(**...)`: the CPU when there is no GPU, `--mixed_precision` (None: Accelerate's own
    setting, e.g. `accelerate launch --mixed_precision`), tracker logs under OUTPUT_DIR/--logging_dir."""
    from accelerate.utils import ProjectConfiguration

    logging_dir = Path(output_dir) / (getattr(args, "logging_dir", None) or "logs")
    return dict(cpu=not torch.cuda.is_available(), log_with=args.report_to, mixed_precision=getattr(args, "mixed_precision", None),
                project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)))


def pipeline_kwargs(args) -> dict:
    """`from_pretrained` arguments of the base pipeline: --revision, --variant, --cache_dir (the hub's
    download cache, as in diffusers) and a --pretrained_vae_model_name_or_path VAE (public weights)."""
    hub = {k: getattr(args, k, None) for k in ("revision", "variant", "cache_dir")}
    hub = {k: v for k, v in hub.items() if v is not None}
    vae_path = getattr(args, "pretrained_vae_model_name_or_path", None)
    if vae_path:
        from diffusers import AutoencoderKL

        local = Path(vae_path).expanduser()
        subfolder = "vae" if (local / "vae" / "config.json").is_file() else None  # a whole pipeline folder
        try:
            hub["vae"] = AutoencoderKL.from_pretrained(str(local) if local.exists() else vae_path, subfolder=subfolder,
                                                       use_safetensors=True, **hub)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--pretrained_vae_model_name_or_path {vae_path}: cannot load an AutoencoderKL ({err})") from None
    return hub


def latent_cache_dir(args, output_dir: Path) -> Path:
    """`--cache_dir` is diffusers' cache ROOT: hub downloads go there (`pipeline_kwargs`) and the latent
    cache (per-example encodings of the PRIVATE images: keep it as private as they are) in its
    `dpdiff_latent_cache/`. A folder that already is a latent cache (built under the earlier meaning) is
    used as it is. Without --cache_dir: OUTPUT_DIR/latent_cache. A caller that runs several trainings on one
    private set (dpdiff tune) shares one cache through `args._latent_cache_dir` (an attribute, not a flag)."""
    shared = getattr(args, "_latent_cache_dir", None)
    if shared:
        return Path(shared)
    root = getattr(args, "cache_dir", None)
    if not root:
        return Path(output_dir) / "latent_cache"
    root = Path(root).expanduser()
    return root if (root / "manifest.json").is_file() else root / LATENT_CACHE_SUBDIR


def before_training(args, plan, family, main: bool) -> None:
    """Print sigma and the noise-to-signal ratio (public hyperparameters only: target epsilon, delta, n, B,
    steps, C); warn when the noise swamps the signal; turn --validation_epochs into steps."""
    if getattr(args, "validation_prompt", None) and family.conditioning == "label":
        raise ConfigError(f"--validation_prompt: a {family.name} pipeline is conditioned on class labels, not text; leave it out")
    epochs = getattr(args, "validation_epochs", None)
    if epochs is not None:  # an expected epoch is 1/q steps
        args.validation_steps = max(1, round(epochs / plan.sample_rate))
        args.validation_epochs = None  # training_config.yaml replays the steps (both set would be a conflict)
    sigma, c, b = plan.noise_multiplier, args.max_grad_norm, plan.batch_size
    if not main:
        return
    print(f"DP-SGD: sigma = {sigma:.4g}, clipping norm C = {c:g}, expected batch B = {b} (q = {plan.sample_rate:.4g}), "
          f"{plan.steps} steps -> epsilon {plan.epsilon:.4g} at delta {plan.delta:g}; noise std per coordinate of the "
          f"averaged update sigma*C/B = {sigma * c / b:.3g}, against a signal of norm <= C = {c:g}", flush=True)
    if sigma / b > NOISE_SWAMPS:
        logger.warning(
            "the noise swamps the signal: sigma = %.4g, so sigma*C/B = %.3g per coordinate against C = %g for the whole "
            "averaged gradient (%.3g x C); the run will mostly learn noise. Raise --target_epsilon, raise --batch_size "
            "(--train_batch_size), or train fewer steps (--max_steps / --max_train_steps)", sigma, sigma * c / b, c, sigma / b)


def lr_schedule(args, optimizer, total_steps: int):
    """`set_lr(step)` before each logical step: diffusers' `get_scheduler` factor at that step times
    --learning_rate. Stateless, so a resumed run continues the same schedule."""
    name, warmup = getattr(args, "lr_scheduler", "constant"), getattr(args, "lr_warmup_steps", 0) or 0
    if name == "constant":
        return lambda step: None
    from diffusers.optimization import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    factor = get_scheduler(name, probe, num_warmup_steps=warmup, num_training_steps=total_steps).lr_lambdas[0]

    def set_lr(step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * factor(step)

    return set_lr


def training_draws(args, noise_scheduler, objective, weights):
    """--snr_gamma as timestep-sampling weights and --noise_offset as an extra per-(example, channel) draw:
    both public randomness inside each example's loss, drawn before clipping; no privacy cost."""
    gamma, offset = getattr(args, "snr_gamma", None), getattr(args, "noise_offset", 0.0) or 0.0
    if gamma is None and not offset:
        return objective, weights
    if getattr(objective, "kind", None) != "denoising":
        raise ConfigError("--snr_gamma / --noise_offset apply to DDPM-style families (SD, SDXL, PixArt, DiT); a flow-matching "
                          "family draws its timesteps with --weighting_scheme")
    if gamma is not None:
        snr = min_snr_weights(noise_scheduler, gamma, objective.prediction_type)
        weights = snr if weights is None else snr * weights.to(snr.dtype)
        weights = weights / weights.sum()
    return (OffsetNoise(objective, offset) if offset else objective), weights


def min_snr_weights(noise_scheduler, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al.; diffusers' --snr_gamma) as sampling weights over the timesteps: drawing t
    with probability proportional to w(t) has the expected gradient of the loss weighted by w(t), and, unlike a
    loss weight, survives per-example clipping. epsilon: min(SNR, g)/SNR; v: min(SNR, g)/(SNR+1); sample: min(SNR, g)."""
    if not (math.isfinite(gamma) and gamma > 0):
        raise ConfigError(f"--snr_gamma must be positive, got {gamma}")
    alphas = noise_scheduler.alphas_cumprod.double()
    snr = alphas / (1 - alphas).clamp_min(1e-30)
    capped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        weights = torch.where(snr > 0, capped / snr.clamp_min(1e-30), torch.ones_like(snr))
    elif prediction_type == "v_prediction":
        weights = capped / (snr + 1)
    else:
        weights = capped
    return weights / weights.sum()


class OffsetNoise:
    """An objective whose noise gets `offset * N(0, 1)` per (row, channel), drawn from the example's own
    generator after its other draws (keyed by (seed, step, example) like them)."""

    def __init__(self, inner, offset: float):
        if not (math.isfinite(offset) and offset > 0):
            raise ConfigError(f"--noise_offset must be a non-negative number, got {offset}")
        self.inner, self.offset = inner, offset

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def draw(self, latents, multiplicity, generators, weights=None):
        noise, timesteps = self.inner.draw(latents, multiplicity, generators, weights)
        shape = (multiplicity, noise.shape[1]) + (1,) * (noise.dim() - 2)
        extra = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(noise.device, noise.dtype)
        return noise + self.offset * extra, timesteps

    def describe(self) -> dict:
        return {**self.inner.describe(), "noise_offset": self.offset}


def captions_only(source) -> bool:
    """A set captioned image by image with no labels (its captions are private): known from its structure."""
    return list(source.class_names) == [CAPTION_ONLY_CLASS] and source.prompt_template is None


def public_prompts(source, args) -> list[str]:
    """The prompts a grid, generation_config.json and the card may show: --validation_prompt, else the
    class prompts, else (captions only) the empty prompt, which training sees through --cond_dropout."""
    given = getattr(args, "validation_prompt", None)
    if given:
        return list(given)
    return [UNCONDITIONAL_PROMPT] if captions_only(source) else list(source.class_prompts)


def sample_rows(source, args, per_class: int):
    """(prompts, labels, images per row) of the sample grid, or None when no public prompt occurs in training."""
    if getattr(args, "validation_prompt", None):
        k = getattr(args, "num_validation_images", None) or DEFAULT_VALIDATION_IMAGES
        return [p for p in args.validation_prompt for _ in range(k)], [0] * (k * len(args.validation_prompt)), k
    if captions_only(source):
        if not args.cond_dropout:
            logger.warning("no sample grid: the captions are private and --cond_dropout 0 never trains the empty prompt; "
                           "pass --validation_prompt")
            return None
        return [UNCONDITIONAL_PROMPT] * per_class, [0] * per_class, per_class
    classes = range(len(source.class_prompts))
    return [source.class_prompts[c] for c in classes for _ in range(per_class)], [c for c in classes for _ in range(per_class)], per_class


def training_source(args) -> ImageSource:
    """The run's private training set: `load_training_source` with the run's data flags."""
    return load_training_source(args.dataset, "train", limit=args.max_train_samples, seed=args.seed, skip_bad_files=args.skip_bad_files,
                 prompt_template=args.prompt_template, image_column=getattr(args, "image_column", None),
                 caption_column=getattr(args, "caption_column", None), resolution=getattr(args, "resolution", None))


def load_training_source(name: str, split: str = "train", limit=None, seed: int = 0, skip_bad_files: bool = False,
                         prompt_template=None, **kwargs) -> ImageSource:
    """`dpdiff.data.load_source`, plus DreamBooth's folder: images lying directly in an `imagefolder:` path
    without a metadata.jsonl, all captioned by a fixed template (--instance_prompt) as one class."""
    from dpdiff.data import load_source

    root = Path(name.split(":", 1)[1]).expanduser() if name.startswith("imagefolder:") else None
    flat = (root is not None and prompt_template is not None and root.is_dir() and not (root / split).is_dir()
            and not (root / "metadata.jsonl").is_file())
    files = _flat_images(root) if flat else []
    if not files:
        return load_source(name, split, limit=limit, seed=seed, skip_bad_files=skip_bad_files, prompt_template=prompt_template, **kwargs)
    from dpdiff.data import check_resolution
    from dpdiff.data.external import files_identity
    from dpdiff.data.image_check import check_files

    if kwargs.get("resolution") is not None:
        check_resolution(kwargs["resolution"])
    if kwargs.get("caption_column"):
        raise DataError(f"image folder {root}: --caption_column needs a metadata.jsonl; --instance_prompt captions every image")
    chosen = [files[i] for i in subsample(len(files), limit, seed)]
    kept, bad = check_files(chosen, skip_bad_files)
    if bad:
        logger.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(bad), root, bad[0])
    kept_files = [chosen[k] for k in kept]
    prompt = prompt_for(CAPTION_ONLY_CLASS, prompt_template, 0)
    dataset = build_file_dataset(kept_files, [0] * len(kept_files), [CAPTION_ONLY_CLASS], [prompt] * len(kept_files))
    source = ImageSource(name, split, dataset, [CAPTION_ONLY_CLASS], prompt_template=prompt_template,
                         identity=files_identity(kept_files))
    source.num_skipped = len(bad)
    return source


def _flat_images(root: Path) -> list[Path]:
    from dpdiff.data.external import IMAGE_SUFFIXES

    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if any(p.is_dir() for p in entries):
        return []  # sub-folders are classes: the ordinary image folder
    return sorted(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
