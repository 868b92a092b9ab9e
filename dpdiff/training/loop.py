"""The DP fine-tuning run: check everything -> load -> encode once -> plan the noise -> DP-SGD
steps -> export the adapter with its privacy record.

Accelerate sets up the device, the process group and the trackers; the DP step itself is
`DPDiffusionEngine` (Opacus). Everything a user can get wrong is refused before the first step."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from dpdiff.adapters import prepare_trainable, save_trained
from dpdiff.data.sources import check_prompt_template
from dpdiff.errors import ConfigError, PrivacyError
from dpdiff.families import family_for_pipeline
from dpdiff.imaging import save_grid
from dpdiff.io import removed_if_left_empty
from dpdiff.pipelines import load_pipeline
from dpdiff.pipelines.loading import cast_frozen_weights, load_dtype
from dpdiff.privacy import accounting
from dpdiff.privacy.diffusion_loss import timestep_weights
from dpdiff.privacy.engine import DPDiffusionEngine
from dpdiff.privacy.ledger import PrivacyLedger, plot_epsilon_curve
from dpdiff.training import checkpoint, diffusers_flags, diffusers_run as hooks, outputs
from dpdiff.training.arguments import DEFAULT_LEARNING_RATES, replayable_flags
from dpdiff.training.latent_cache import build_latent_cache
from dpdiff.training.memory_plan import plan_memory

logger = logging.getLogger(__name__)
SAMPLES_PER_CLASS = 8


def check_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Pure checks and defaults: no file, model or data touched yet."""
    diffusers_flags.resolve(args)  # diffusers' flag names -> dpdiff's (dpdiff/training/diffusers_flags.py)
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATES[args.method]
    if args.epochs is None and args.max_steps is None:
        args.epochs = 1.0
    if args.max_steps is not None:
        args.epochs = None
    positive = {"batch_size": args.batch_size, "physical_batch_size": args.physical_batch_size,
                "max_grad_norm": args.max_grad_norm, "learning_rate": args.learning_rate,
                "noise_multiplicity": args.noise_multiplicity, "rank": args.rank}
    bad = {k: v for k, v in positive.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    if bad:
        raise ConfigError(f"these options must be finite and positive: {bad}")
    if args.physical_batch_size > args.batch_size:
        raise ConfigError(
            f"--physical_batch_size {args.physical_batch_size} > --batch_size {args.batch_size}: the physical "
            "micro-batch only splits a logical batch; make it <= the logical batch size"
        )
    encode_batch = getattr(args, "encode_batch_size", None)
    if encode_batch is not None and (isinstance(encode_batch, bool) or not isinstance(encode_batch, int) or encode_batch <= 0):
        raise ConfigError(f"--encode_batch_size must be a positive integer, got {encode_batch!r}")
    if not 0 <= args.ema_decay < 1:
        raise ConfigError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if not 0 <= args.cond_dropout < 1:
        raise ConfigError(f"--cond_dropout must be in [0, 1), got {args.cond_dropout}")
    accounting.check_epsilon(args.target_epsilon)
    if args.prompt_template is not None:
        check_prompt_template(args.prompt_template)
    _timestep_weights(args, max(1000, args.timestep_bias_end or 0))  # the scheduler's own length is checked once loaded
    if args.max_steps is not None and args.max_steps <= 0:
        raise ConfigError(f"--max_steps must be positive, got {args.max_steps}")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise ConfigError(f"--epochs must be positive, got {args.epochs}")
    if args.push_to_hub:
        from dpdiff.hub import check_hub_ready

        args.hub_model_id = args.hub_model_id or Path(args.output_dir).name
        check_hub_ready(args.hub_model_id, args.hub_token)
    return args


def _timestep_weights(args: argparse.Namespace, num_train_timesteps: int) -> torch.Tensor | None:
    try:
        return timestep_weights(num_train_timesteps, args.timestep_bias_strategy, args.timestep_bias_multiplier,
                                args.timestep_bias_portion, args.timestep_bias_begin, args.timestep_bias_end)
    except ValueError as err:
        raise ConfigError(f"--{err} (see --timestep_bias_* in --help)") from None


@dataclass
class FinetuneResult:
    record: dict  # what privacy.json says
    pipeline: object  # the base pipeline with the released (EMA) weights in place
    output_dir: Path


def finetune(args: argparse.Namespace) -> FinetuneResult:
    """Run one DP fine-tuning job; the adapter, privacy.json and model card land in output_dir."""
    args = check_arguments(args)
    existed = Path(args.output_dir).exists()
    with removed_if_left_empty(args.output_dir):
        result = _finetune(args)
    if result.record.get("dry_run") and not existed and not any(result.output_dir.iterdir()):
        result.output_dir.rmdir()  # a dry run leaves nothing behind
    return result


def _finetune(args: argparse.Namespace) -> FinetuneResult:
    output_dir = outputs.prepare_output_dir(args.output_dir, args.overwrite_output_dir, bool(args.resume_from_checkpoint))
    resume_path = checkpoint.resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None

    accelerator = Accelerator(**hooks.accelerator_kwargs(args, output_dir))
    main = accelerator.is_main_process
    set_seed(args.seed)
    precision = accelerator.mixed_precision  # Accelerate's --mixed_precision: the frozen weights' dtype
    memory = _memory_plan(args, accelerator.device, precision)  # from the configs: before any data or weights
    if getattr(args, "dry_run", False):
        if main:
            print(memory.describe())
        return FinetuneResult({"dry_run": True, "memory_plan_gib": round(memory.peak_bytes / 2**30, 3)}, None, output_dir)

    # `dpdiff tune` hands each trial its training split (validation examples held out) and its plan, sigma calibrated for
    # the whole search (dpdiff/tuning/): attributes, not flags, so neither is replayed nor logged
    source = getattr(args, "_training_source", None) or hooks.training_source(args)
    plan = getattr(args, "_privacy_plan", None) or accounting.plan(
        args.target_epsilon, args.delta, len(source), args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
        accountant=args.accountant, force_delta=args.force_delta)
    pipeline = load_pipeline(args.pretrained_model_name_or_path,
                             torch_dtype=load_dtype(precision, args.method, args.train_condition_embedder), **hooks.pipeline_kwargs(args))
    family = family_for_pipeline(pipeline)
    denoiser = family.denoiser(pipeline)
    noise_scheduler = family.training_scheduler(pipeline)
    objective = family.objective(noise_scheduler, weighting_scheme=getattr(args, "weighting_scheme", "none"))
    weights = _timestep_weights(args, objective.num_train_timesteps)
    objective, weights = hooks.training_draws(args, noise_scheduler, objective, weights)  # --snr_gamma, --noise_offset
    pipeline.set_progress_bar_config(disable=True)
    resolution = getattr(args, "resolution", None) or family.resolution(pipeline)
    channels = 1 if source.dataset[0]["image"].mode in ("1", "L", "I", "I;16", "F") else 3
    family.train_mode(denoiser)  # per-sample gradients need training mode (no denoiser mixes examples)
    summary = prepare_trainable(denoiser, args.method, rank=args.rank, lora_alpha=args.lora_alpha,
                                target_modules=args.lora_target_modules, attention_start_index=args.attention_start_index,
                                train_condition_embedder=args.train_condition_embedder, family=family)
    if getattr(args, "gradient_checkpointing", False):
        denoiser.enable_gradient_checkpointing()  # the engine refuses it unless every trained layer is fused
    for component in family.frozen_components(pipeline):
        component.requires_grad_(False)
    cast_frozen_weights(pipeline, precision)  # frozen weights in bf16/fp16, trained ones fp32 (diffusers' cast_training_params)
    pipeline.to(accelerator.device)
    if main:
        logger.info("%s %s: %d trainable / %d parameters; plan %s", family.name, args.method, summary.trainable_params,
                    summary.total_params, plan)
    hooks.before_training(args, plan, family, main)  # sigma and the noise-to-signal ratio, printed; --validation_epochs

    cache_dir = hooks.latent_cache_dir(args, output_dir)
    with accelerator.main_process_first():  # one process encodes; the others find the finished cache
        cache = build_latent_cache(pipeline, source, resolution, args.cond_dropout, args.seed, show_progress=main, family=family,
                                   random_flip=getattr(args, "random_flip", False), cache_dir=cache_dir,
                                   batch_size=getattr(args, "encode_batch_size", None),
                                   replace_mismatch=not getattr(args, "cache_dir", None) and args.overwrite_output_dir
                                   and not resume_path)
    encoders = _Encoders(pipeline, family, accelerator.device, resolution, precision)
    encoders.offload()  # the frozen VAE and text encoders did their work; free the accelerator for the denoiser
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    engine = DPDiffusionEngine(
        denoiser, noise_scheduler, optimizer, cache, family=family, objective=objective,
        batch_size=args.batch_size, physical_batch_size=args.physical_batch_size,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=args.max_grad_norm,
        noise_multiplicity=args.noise_multiplicity, timestep_weights=weights, grad_sample_mode=args.grad_sample_mode, clipping=args.clipping,
        secure_mode=args.secure_mode, seed=args.seed, privacy_seed=args.privacy_seed,
        distributed=accelerator.num_processes > 1, precision=precision,
    )
    ema = EMAModel(params, decay=args.ema_decay) if args.ema_decay > 0 else None
    ledger = PrivacyLedger(plan.delta, plan.accountant)
    if resume_path is not None:
        _restore(resume_path, denoiser, engine, ema, ledger)

    if args.report_to:
        accelerator.init_trackers("dpdiff", config=_tracker_config(args))
    _train(args, accelerator, pipeline, engine, cache, ema, ledger, plan, output_dir, source, encoders)

    if ema is not None:
        ema.copy_to(params)  # the released weights are the EMA (post-processing: no privacy cost)
    record = outputs.privacy_record(args, plan, ledger, engine, summary, len(source))
    if record["epsilon"] > plan.target_epsilon * (1 + 1e-6):
        raise PrivacyError(f"spent epsilon {record['epsilon']} exceeds the target {plan.target_epsilon}; refusing to export")
    if main:
        save_trained(denoiser, output_dir, args.method, family=family)
        outputs.write_records(output_dir, record, outputs.generation_config(args, source, resolution, channels, family),
                              replayable_flags(args))
        with encoders.loaded():
            _sample_grid(pipeline, family, source, args, resolution, output_dir / "samples.png")
        plot_epsilon_curve(ledger, output_dir / "epsilon_curve.png", title=f"{args.method}: epsilon spent (delta={plan.delta:g})")
        from dpdiff.hub import push_to_hub, write_model_card

        license_ = "apache-2.0" if args.pretrained_model_name_or_path == "dpdiff-tiny" else "other"
        write_model_card(output_dir, repo_id=args.hub_model_id if args.push_to_hub else None, license=license_)
        if args.push_to_hub:
            push_to_hub(output_dir, args.hub_model_id, token=args.hub_token, license=license_)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return FinetuneResult(record, pipeline, output_dir)


def _epsilon_bound(ledger, plan, done: int, every: int) -> float:
    """Epsilon after the next accountant call's step (every `every` steps, and the last): an upper bound on the
    epsilon of every step up to it."""
    ahead = min(plan.steps, (done // every + 1) * every) - done
    return ledger.epsilon_after(ahead, plan.noise_multiplier, plan.sample_rate) if ahead > 0 else ledger.epsilon()


def _train(args, accelerator, pipeline, engine, cache, ema, ledger, plan, output_dir: Path, source, encoders) -> None:
    main = accelerator.is_main_process
    start = ledger.steps
    every = max(1, plan.steps // 50)  # an accountant call (~0.25 s with PRV) every `every` steps, not every step
    epsilon, bound = ledger.epsilon(), _epsilon_bound(ledger, plan, start, every)
    bar = tqdm(range(start, plan.steps), initial=start, total=plan.steps, desc=f"DP {args.method}", disable=not main)
    clip_watch = _ClipWatch(args.max_grad_norm, warn=main)
    set_lr = hooks.lr_schedule(args, engine.optimizer, plan.steps)  # --lr_scheduler: stateless, so a resume continues it
    for step in bar:
        set_lr(step)
        cache.step = engine.steps_taken  # keys the classifier-free-guidance coin like the noise draws
        stats = engine.step()
        ledger.record(plan.noise_multiplier, plan.sample_rate)
        if ema is not None:
            ema.step(engine.params)
        done = step + 1
        exact = done % every == 0 or done == plan.steps
        if exact:
            epsilon, bound = ledger.epsilon(), _epsilon_bound(ledger, plan, done, every)
        # between two accountant calls the bar shows the epsilon spent by the next one: never below the spent
        bar.set_postfix_str(f"loss={stats.loss:.4f}, eps{'=' if exact else '<='}{epsilon if exact else bound:.3f}, "
                            f"batch={stats.num_examples}, clipped={stats.clipped_fraction:.2f}")
        clip_watch.add(stats)
        if args.report_to:  # trackers get epsilon where it is exact, so their curve is the spent one
            accelerator.log({"loss": stats.loss, **({"epsilon": epsilon} if exact else {}), "examples": stats.num_examples,
                             "clipped_fraction": stats.clipped_fraction}, step=done)
        if args.checkpointing_steps and done % args.checkpointing_steps == 0 and done < plan.steps:
            _checkpoint(args, accelerator, engine.model, engine, ema, ledger, output_dir, done)
        if main and args.validation_steps and done % args.validation_steps == 0 and done < plan.steps:
            grid = output_dir / f"samples-{done}.png"
            with encoders.loaded():
                _with_ema(ema, engine.params, lambda: _sample_grid(pipeline, engine.family, source, args, encoders.resolution, grid))
    if ledger.steps != engine.steps_taken:
        raise RuntimeError(f"ledger counted {ledger.steps} steps but the engine took {engine.steps_taken}")


class _ClipWatch:
    """Warns once when, over the first steps, most examples were NOT clipped: the noise is sized to C,
    so a C far above the gradients wastes most of it. (The share comes from private data, like the
    loss in the progress bar: a local diagnostic, not covered by the guarantee.)"""

    FIRST_STEPS = 10

    def __init__(self, max_grad_norm: float, warn: bool):
        self.max_grad_norm, self.warn, self.steps, self.clipped, self.examples = max_grad_norm, warn, 0, 0.0, 0

    def add(self, stats) -> None:
        if self.steps >= self.FIRST_STEPS or not stats.num_examples or math.isnan(stats.clipped_fraction):
            return
        self.steps += 1
        self.clipped += stats.clipped_fraction * stats.num_examples
        self.examples += stats.num_examples
        share = self.clipped / self.examples
        if self.steps == self.FIRST_STEPS and share < 0.5 and self.warn:
            logger.warning(
                "only %.0f%% of the per-example gradients exceeded --max_grad_norm %g in the first %d steps; the noise is "
                "sized to C, so a C that most gradients exceed (smaller) gives the same guarantee with less relative noise. "
                "Choosing C on the private data is not covered by the guarantee (docs/privacy.md)",
                100 * share, self.max_grad_norm, self.FIRST_STEPS)


def _checkpoint(args, accelerator, unet, engine, ema, ledger, output_dir, step) -> None:
    engine_state = engine.state_dict()  # a collective when distributed: every rank calls it
    if accelerator.is_main_process:
        trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        state = {"engine": engine_state, "optimizer": engine.optimizer.original_optimizer.state_dict(),
                 "ema": ema.state_dict() if ema is not None else None, "step": step}
        checkpoint.save_checkpoint(output_dir, step, trainable, state, ledger.state_dict(), args.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def _restore(path: Path, unet, engine, ema, ledger) -> None:
    trainable, state, ledger_state = checkpoint.load_checkpoint(path)
    named = dict(unet.named_parameters())
    expected = {n for n, p in named.items() if p.requires_grad}
    if set(trainable) != expected:
        raise ConfigError(f"checkpoint {path} trains other parameters than this run (method/rank/targets changed); resume with the same settings")
    with torch.no_grad():
        for name, value in trainable.items():
            named[name].copy_(value)
    engine.load_state_dict(state["engine"])
    engine.optimizer.original_optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    ledger.load_state_dict(ledger_state)
    if ledger.steps != engine.steps_taken:
        raise PrivacyError(f"checkpoint {path}: ledger has {ledger.steps} steps but the engine {engine.steps_taken}; it is inconsistent")


def _with_ema(ema, params, fn):
    if ema is None:
        return fn()
    ema.store(params)
    ema.copy_to(params)
    try:
        return fn()
    finally:
        ema.restore(params)


class _Encoders:
    """Moves the family's frozen VAE and text encoders off the accelerator once the latent cache holds their
    outputs (the T5 of SD3/Flux is larger than many denoisers), and back while a sample grid is drawn, under
    the run's autocast (the denoiser's frozen weights are then bf16/fp16, its trained ones fp32)."""

    def __init__(self, pipeline, family, device, resolution: int, precision: str = "no"):
        self.pipeline, self.device, self.precision = pipeline, torch.device(device), precision
        self.names = family.text_encoder_names(pipeline) + (["vae"] if getattr(pipeline, "vae", None) is not None else [])
        self.resolution = resolution  # the trained one: the grids show what was learned

    def offload(self) -> None:
        if self.device.type != "cpu":
            for name in self.names:
                getattr(self.pipeline, name).to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @contextlib.contextmanager
    def loaded(self):
        for name in self.names:
            getattr(self.pipeline, name).to(self.device)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
                    if self.precision in ("bf16", "fp16") else contextlib.nullcontext())
        try:
            with autocast:
                yield
        finally:
            self.offload()


def _memory_plan(args, device, precision: str):
    """The run's peak device memory from the model configs (dpdiff/training/memory_plan.py); refuses one that
    cannot fit, naming the flag to change. `--device_memory_gib` plans for another device (or overrides)."""
    budget = getattr(args, "device_memory_gib", None)
    try:
        memory = _plan_memory(args, device, precision, budget)
    except ConfigError:
        raise
    except Exception as err:  # a config the meta trace cannot run: train without a plan rather than not at all
        if getattr(args, "dry_run", False):
            raise
        logger.warning("no memory plan for this model (%s: %s); training without one", type(err).__name__, err)
        return None
    logger.info("%s", memory.describe())
    memory.check()
    return memory


def _plan_memory(args, device, precision: str, budget):
    return plan_memory(args.pretrained_model_name_or_path, method=args.method, precision=precision,
                       physical_batch_size=args.physical_batch_size, resolution=getattr(args, "resolution", None),
                       gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
                       noise_multiplicity=args.noise_multiplicity, rank=args.rank, lora_alpha=args.lora_alpha,
                       lora_target_modules=args.lora_target_modules, attention_start_index=args.attention_start_index,
                       train_condition_embedder=args.train_condition_embedder, ema=args.ema_decay > 0,
                       grad_sample_mode=args.grad_sample_mode, clipping=args.clipping, device=device,
                       free_bytes=int(budget * 2**30) if budget else None)


@torch.no_grad()
def _sample_grid(pipeline, family, source, args, resolution: int, path: Path) -> None:
    """Synthetic samples only, generated from the current weights: a row per --validation_prompt, else per class."""
    if (rows := hooks.sample_rows(source, args, SAMPLES_PER_CLASS)) is None:
        return  # a captions-only set with no public prompt that training saw
    prompts, labels, per_row = rows
    generator = torch.Generator().manual_seed(args.seed)
    images = []
    for i in range(0, len(prompts), 40):
        images += family.generate(pipeline, prompts[i : i + 40], labels[i : i + 40], generator=generator,
                                  num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                  resolution=resolution)
    save_grid(images, path, nrow=per_row, scale=2)


def _tracker_config(args) -> dict:
    hidden = {"hub_token", "privacy_seed"}
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
            if k not in hidden and not k.startswith("_") and v is not None}
