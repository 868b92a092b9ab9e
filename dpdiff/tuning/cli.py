"""`dpdiff tune`: a private hyperparameter search whose whole cost is inside one (epsilon, delta).

    dpdiff tune --config recipes/configs/tune_lora.yaml --target_epsilon 10 --delta 1e-5 --output_dir tuned
    dpdiff tune --config recipes/configs/tune_lora.yaml --target_epsilon 10 --output_dir tuned --resume
    dpdiff budget --epsilon 10 --num-examples 60000 --tune recipes/configs/tune_lora.yaml

The search space, the trial distribution and the score settings are public; the number of trials is drawn
secretly and never printed. A user mistake prints one line and exits with code 2, before any work.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from dpdiff.errors import DPDiffError

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--config", required=True, help="the search YAML: fixed / search / trials / score (recipes/configs/tune_lora.yaml)")
    a("--target_epsilon", type=float, required=True, help="the TOTAL epsilon of the search (score release + every trial + selection)")
    a("--delta", type=float, default=1e-5, help="the total delta (must be < 1/n)")
    a("--output_dir", default="dpdiff-tune", help="the best adapter, one privacy.json and model card; .tune/ holds the private state while it runs")
    a("--resume", action="store_true", help="continue a killed search in --output_dir (same count, trials, release and ledger)")
    a("--overwrite_output_dir", action="store_true", help="replace a finished search's results in --output_dir")
    a("--device", default="cpu", help="device of the score's feature extractor (the trials use Accelerate's)")


def run(args: argparse.Namespace) -> int:
    from dpdiff.tuning.search import tune
    from dpdiff.tuning.space import load_space

    try:
        space = load_space(args.config)
        result = tune(space, args.target_epsilon, args.delta, args.output_dir, resume=args.resume,
                      overwrite=args.overwrite_output_dir, device=args.device)
    except DPDiffError as err:
        print(f"dpdiff tune: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if result.privacy is None:
        print(f"dpdiff tune: the random number of trials was zero (possible with poisson); nothing released -> {result.output_dir}")
        return 0
    p = result.privacy
    print(f"done: the whole search is ({p['epsilon']:.4g}, {p['delta']:g})-DP (target {p['target_epsilon']:g}); "
          f"best adapter, privacy.json and model card -> {result.output_dir}")
    return 0


def search_budget(space, target_epsilon: float, delta: float, num_examples: int) -> dict:
    """What a search would cost on `num_examples` private examples (the expected training split)."""
    from dpdiff.privacy.accounting import check_delta
    from dpdiff.tuning.accounting import calibrate
    from dpdiff.tuning.score import ScoreConfig
    from dpdiff.tuning.search import profile_of

    score = ScoreConfig.from_dict(space.score)
    check_delta(delta, num_examples)
    num_train = max(1, round(num_examples * (1 - score.validation_fraction)))
    profiles = [profile_of(f, num_train) for f in space.profile_flags()]
    plan = calibrate(target_epsilon, delta, profiles, space.distribution, space.mean_trials, score.epsilon_share)
    result = {**plan.to_dict(), "num_examples": num_examples, "expected_training_examples": num_train,
              "naive_composition_trials": math.ceil(plan.mean_trials)}
    if plan.shape is not None:  # the alternative to weigh: the same number of trials, public, composed
        fixed = calibrate(target_epsilon, delta, profiles, "fixed", math.ceil(plan.mean_trials), score.epsilon_share)
        result["fixed_count_reference_sigma"] = fixed.profiles[fixed.reference].noise_multiplier
    return result


def format_search_budget(r: dict) -> str:
    lines = [
        f"{'total epsilon':<24}{r['epsilon']:.4f}  (target {r['target_epsilon']:g}, delta {r['delta']:g})",
        f"{'trials':<24}" + (f"{r['mean_trials']:g}, a fixed public count, all composed" if r["shape"] is None else
                             f"{r['distribution']} with mean {r['mean_trials']:g} (the count is drawn secretly)"),
        f"{'score release sigma':<24}{r['score_noise_multiplier']:.4f}  ({r['score_epsilon_share']:g} of the target alone)",
    ]
    for i, p in enumerate(r["profiles"]):
        mark = "  (reference)" if i == r["reference"] else ""
        lines.append(f"{'trial sigma':<24}{p['noise_multiplier']:.4f}  at q={p['sample_rate']:.6g}, {p['steps']} steps{mark}")
    lines += [
        f"{'one trial alone':<24}{r['single_trial_epsilon']:.4f}",
        f"{'naive composition':<24}{r['naive_epsilon']:.4f}  (score + {r['naive_composition_trials']} trials composed, same sigma)",
        *([f"{'fixed count instead':<24}reference sigma {r['fixed_count_reference_sigma']:.4f} for exactly "
           f"{r['naive_composition_trials']} public trials composed (distribution: fixed)"] if "fixed_count_reference_sigma" in r else []),
        f"{'accountant':<24}{r['accountant']}",
        f"note: training split about {r['expected_training_examples']} of {r['num_examples']} examples (the rest scores)",
    ]
    return "\n".join(lines)


def budget_main(args: argparse.Namespace) -> int:
    """`dpdiff budget --tune SEARCH_YAML --epsilon E --num-examples N`."""
    from dpdiff.errors import ConfigError
    from dpdiff.tuning.space import load_space

    try:
        if args.epsilon is None:
            raise ConfigError("--tune calibrates sigma for a whole search: give --epsilon (the total), not --noise-multiplier")
        if args.num_examples is None:
            raise ConfigError("--tune needs --num-examples (the private set's size)")
        if args.steps is not None or args.epochs is not None or args.sample_rate is not None or args.batch_size is not None:
            raise ConfigError("--tune takes the batch size and length from the search config: drop --steps/--epochs/"
                              "--sample-rate/--batch-size")
        result = search_budget(load_space(args.tune), args.epsilon, args.delta, args.num_examples)
    except DPDiffError as err:
        print(f"dpdiff budget: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result, sort_keys=True) if args.json else format_search_budget(result))
    return 0
