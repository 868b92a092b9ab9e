"""Run a private hyperparameter search: check -> split -> calibrate -> secret count -> trials, each scored against the
validation release (made once, at the first score) -> keep the best -> one privacy.json and model card for the search.

Everything secret lives in OUTPUT_DIR/.tune (mode 0700): the trial count, each trial's drawn configuration and
score, the noisy validation release, the trials' folders. A killed search resumes (`--resume`) at the trial it was
in (that trial from its last checkpoint) with the same count, configurations, release and ledger. When the search
ends, the best trial's adapter is copied out and .tune is deleted: no losing model, count or score survives.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dpdiff.errors import ConfigError, PrivacyError
from dpdiff.io import write_json
from dpdiff.privacy.accounting import check_delta, check_epsilon, steps_for

logger = logging.getLogger(__name__)
STATE_DIR = ".tune"
STATE_FILE = "state.json"
RELEASE_FILE = "score_release.safetensors"
# per-trial files that describe the trial alone: replaced by the search's own, or private to the search
NOT_EXPORTED = {"privacy.json", "README.md", "epsilon_curve.png", "checkpoints", "latent_cache"}
STATE_VERSION = 1


@dataclass
class TuneResult:
    output_dir: Path
    privacy: dict | None  # None: the draw gave zero trials (Poisson), nothing was released


def tune(space, target_epsilon, delta, output_dir, resume=False, overwrite=False, device="cpu") -> TuneResult:
    """Run (or resume) the search of `space` (a dpdiff.tuning.space.SearchSpace) within (target_epsilon, delta)."""
    from dpdiff.tuning.score import ScoreConfig

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:  # every process would draw its own secret count and configurations: one search, N draws
        raise ConfigError(f"dpdiff tune runs as ONE process (launched with {processes}): the trial count and each trial's "
                          "flags are drawn once from OS entropy, and a second process would draw its own. Run "
                          "`dpdiff tune ...` without accelerate launch; each trial then uses one device")
    target = check_epsilon(target_epsilon)
    check_delta(delta)
    score_config = ScoreConfig.from_dict(space.score)
    out = Path(output_dir)
    state_dir = out / STATE_DIR
    state_path = state_dir / STATE_FILE
    if resume and not state_path.is_file():
        raise ConfigError(f"--resume: no search in progress in {out} (no {STATE_DIR}/{STATE_FILE})")
    if not resume:
        if state_path.is_file():
            raise ConfigError(f"a search is in progress in {out}: continue it with --resume (a fresh one would spend the budget again)")
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise ConfigError(f"{out} is not empty: choose a new --output_dir or pass --overwrite_output_dir")
            shutil.rmtree(out)
    base = _trial_args(space, {}, out, target, delta)  # every fixed flag checked before the data is touched
    source, train, validation = _load_and_split(base, score_config)
    check_delta(delta, len(source))
    plan = _calibrate(space, len(train), target, delta, score_config)
    state = _load_state(state_path) if resume else None
    if state is None:
        state = _new_state(space, plan, state_dir, target, delta, score_config)
    elif state["plan"] != _jsonable(plan.to_dict()):
        raise PrivacyError("the search config, data or budget changed since the search started: the calibration differs. "
                           "Resume with the same --config, data, --target_epsilon and --delta")
    prompts = _public_prompts(base, train)
    data = {"train": train, "validation": validation, "prompts": prompts, "device": device}
    for i in range(len(state["done"]), state["count"]):
        _run_trial(i, space, state, plan, data, score_config, out, target, delta, state_path)
    return _finish(state, plan, out, score_config, space)


def _trial_args(space, drawn: dict, out: Path, target, delta):
    from dpdiff.config import args_from_dict
    from dpdiff.training.arguments import add_finetune_arguments
    import argparse

    flags = {**space.fixed, **drawn, "output_dir": str(out / STATE_DIR / "trial"), "target_epsilon": target, "delta": delta,
             "accountant": "rdp", "push_to_hub": False}
    parser = add_finetune_arguments(argparse.ArgumentParser(), method=flags.get("method"))
    return args_from_dict(parser, flags, source="search config")


def _load_and_split(args, score_config):
    from dpdiff.training.diffusers_run import load_training_source
    from dpdiff.tuning.score import split_source

    source = load_training_source(args.dataset, "train", limit=args.max_train_samples, seed=args.seed,
                                  skip_bad_files=args.skip_bad_files, prompt_template=args.prompt_template,
                                  image_column=args.image_column, caption_column=args.caption_column, resolution=args.resolution)
    train, validation = split_source(source, score_config.validation_fraction, score_config.salt)
    return source, train, validation


def profile_of(flags: dict, num_train: int) -> tuple[float, int]:
    """(q, steps) a trial with these finetune flags takes, as the loop computes them."""
    batch = flags.get("batch_size") or 256
    if batch > num_train:
        raise ConfigError(f"batch_size {batch} > the {num_train} training examples left after the validation split")
    q = batch / num_train
    max_steps, epochs = flags.get("max_steps"), flags.get("epochs")
    if max_steps is not None:
        return q, steps_for(q, max_steps=max_steps)
    return q, steps_for(q, epochs=1.0 if epochs is None else epochs)


def _calibrate(space, num_train, target, delta, score_config):
    from dpdiff.tuning.accounting import calibrate

    profiles = [profile_of(f, num_train) for f in space.profile_flags()]
    return calibrate(target, delta, profiles, space.distribution, space.mean_trials, score_config.epsilon_share)


def _new_state(space, plan, state_dir: Path, target, delta, score_config) -> dict:
    from dpdiff.tuning.trials import draw_count

    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    count = draw_count(space.distribution, space.mean_trials)  # OS entropy; written only to the private state
    state = {"version": STATE_VERSION, "count": count, "configs": [space.draw() for _ in range(count)], "done": [],
             "best": None, "plan": _jsonable(plan.to_dict()), "ledger": []}
    write_json(state_dir / STATE_FILE, state)
    return state


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PrivacyError(f"the search state {path} is unreadable ({err}); it holds the secret trial count, which must "
                           "not be drawn again: restore it, or start a new search in a new folder (it spends the budget again)")
    if state.get("version") != STATE_VERSION or not {"count", "configs", "done", "plan", "ledger"} <= set(state):
        raise PrivacyError(f"{path} is not a dpdiff tune state (version {STATE_VERSION})")
    return state


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=float))


def _public_prompts(args, train) -> tuple[list[str], list[int]]:
    """What the score samples from: one public prompt per class, or --validation_prompt, or the empty prompt for a
    captions-only set (its captions are private): the sample grid's rule (training/diffusers_run.py)."""
    from dpdiff.training.diffusers_run import sample_rows

    rows = sample_rows(train, args, 1)
    if rows is None:
        raise ConfigError("the score has no public prompt to sample from: this set's captions are private and cond_dropout "
                          "is 0; set validation_prompt (a public prompt) in 'fixed'")
    return rows[0], rows[1]


def _score_release(data, score_config, plan, resolution: int, channels: int, state_dir: Path) -> dict:
    """The validation release, made once (at the first score) and kept in the private state; a resume reads it."""
    from dpdiff.tuning import score as scoring

    path = state_dir / RELEASE_FILE
    if not path.is_file():
        tensors = scoring.release_validation(data["validation"], score_config, plan.score_noise_multiplier, resolution,
                                             channels, data["device"])
        scoring.save_release(tensors, path)
    return scoring.load_release(path)


def _run_trial(i, space, state, plan, data, score_config, out, target, delta, state_path):
    from dpdiff.families import family_for_pipeline
    from dpdiff.training.loop import finetune
    from dpdiff.tuning import score as scoring
    from dpdiff.tuning.accounting import trial_plan

    config = state["configs"][i]
    trial_dir = out / STATE_DIR / f"trial-{i}"
    args = _trial_args(space, config, out, target, delta)
    args.output_dir = str(trial_dir)
    train = data["train"]
    q, steps = profile_of(vars(args), len(train))
    sigma = plan.sigma_for(q, steps)
    epochs = None if args.max_steps is not None else (args.epochs or 1.0)
    args._privacy_plan = trial_plan(sigma, q, steps, delta, len(train), args.batch_size, epochs, args.accountant)
    args._training_source = train
    if not args.cache_dir:  # one latent cache for every trial (same data and encoders), private, deleted with .tune
        args._latent_cache_dir = str(out / STATE_DIR / "latent_cache")
    if trial_dir.is_dir() and any((trial_dir / "checkpoints").glob("checkpoint-*")):
        args.resume_from_checkpoint = "latest"  # the same trial, continued: its ledger and noise state are in the checkpoint
    else:
        args.overwrite_output_dir = True  # killed before its first checkpoint: nothing of it was released; run it whole
    logger.info("tune: trial (%s) with sigma %.4f", ", ".join(f"{k}={v}" for k, v in sorted(config.items())), sigma)
    result = finetune(args)
    history = result.record["ledger"]["history"]
    if [tuple(h) for h in history] != [(sigma, q, steps)]:
        raise PrivacyError(f"trial ran {history}, not the calibrated (sigma, q, steps) = {(sigma, q, steps)}")
    family = family_for_pipeline(result.pipeline)
    resolution = args.resolution or family.resolution(result.pipeline)
    first = train.dataset[0]["image"]
    channels = 1 if first.mode in ("1", "L", "I", "I;16", "F") else 3
    release = _score_release(data, score_config, plan, resolution, channels, state_path.parent)
    images = scoring.sample_trial(result.pipeline, family, *data["prompts"], score_config, resolution, args.seed,
                                  args.num_inference_steps, args.guidance_scale)
    value = scoring.score_images(images, release, score_config, resolution, channels, data["device"])
    state["done"].append({"score": value, "config": config})
    state["ledger"].append(history[0])
    best = state["best"]
    if best is None or value < state["done"][best]["score"]:
        if best is not None:
            shutil.rmtree(out / STATE_DIR / f"trial-{best}", ignore_errors=True)
        state["best"] = i
    else:
        shutil.rmtree(trial_dir, ignore_errors=True)  # a losing trial is never released
    write_json(state_path, state)


def _finish(state, plan, out: Path, score_config, space) -> TuneResult:
    from dpdiff.tuning.report import export_best

    if state["best"] is None:  # Poisson drew K = 0: the search outputs nothing (part of the mechanism)
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        logger.warning("tune: the random number of trials came out as zero; nothing is released (the budget is spent)")
        return TuneResult(out, None)
    for entry in state["ledger"]:
        q, steps = entry[1], entry[2]
        if not math.isclose(entry[0], plan.sigma_for(q, steps), rel_tol=0, abs_tol=0):
            raise PrivacyError(f"a trial's ledger {entry} does not match the calibrated sigma; refusing to export")
    best_dir = out / STATE_DIR / f"trial-{state['best']}"
    privacy = export_best(best_dir, out, plan, score_config, space, state["done"][state["best"]]["config"])
    shutil.rmtree(out / STATE_DIR)
    return TuneResult(out, privacy)
