"""What a search publishes: the best trial's adapter, ONE privacy.json stating the whole search, one model card.

The record keeps the selected trial's own numbers (sigma, q, steps, C: the selected configuration is part of the
output) but its epsilon is the search's total; the trial count, the losing trials and their scores are not in it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import yaml

from dpdiff.io import write_json, write_text
from dpdiff.training.outputs import TRAINING_CONFIG

COMPOSITION = ("sequential: the score's validation release composed with repeat-and-select over the trials (RDP adds), "
               "although the two parts use disjoint examples (conservative; docs/privacy.md)")
NOT_COVERED_TUNING = re.compile(r"- \*\*Not covered: hyperparameter tuning on the private data\.\*\*.*?(?=\n- \*\*)", re.S)


def search_record(trial_privacy: dict, plan, score_config, space, selected: dict) -> dict:
    """privacy.json of a search: the trial's record with the search's guarantee in place of the trial's."""
    record = {k: v for k, v in trial_privacy.items() if k not in ("ledger", "planned_steps", "target_epsilon")}
    shape = plan.to_dict()["shape"]
    fixed = plan.shape is None
    record.update({
        "epsilon": plan.epsilon,
        "target_epsilon": plan.target_epsilon,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "search_summary": (f"private hyperparameter search: {int(plan.mean_trials)} trials (a public count), all composed, "
                           "best kept by a DP validation score; epsilon covers the whole search" if fixed else
                           f"private hyperparameter search (Papernot & Steinke 2022): a secret, {plan.distribution}-"
                           f"distributed number of trials (mean {plan.mean_trials:g}), best kept by a DP validation score; "
                           "epsilon covers the whole search"),
        "search": {
            "method": "composition" if fixed else "repeat_and_select",
            "distribution": plan.distribution,
            "shape": shape,
            "mean_trials": plan.mean_trials,
            "trial_count": int(plan.mean_trials) if fixed else "secret: drawn from OS entropy, never published",
            "composition": COMPOSITION,
            "events": {  # enough to recompute epsilon with dp-accounting (tests/test_tuning_accounting.py does)
                "score_release": {"gaussian_noise_multiplier": plan.score_noise_multiplier, "count": 2},
                "trial_reference": plan.to_dict()["profiles"][plan.reference],
                "repeat_and_select": {"mean": plan.mean_trials, "shape": shape},  # shape None: mean trials composed
            },
            "profiles": plan.to_dict()["profiles"],
            "profile_rule": "each profile's RDP <= the reference's at every order of dp-accounting's default grid",
            "single_trial_epsilon": plan.single_trial_epsilon,
            "naive_composition_epsilon": plan.naive_epsilon,
            "naive_composition_trials": math.ceil(plan.mean_trials),
            "score": {**score_config.to_dict(), "noise_multiplier": plan.score_noise_multiplier,
                      "releases": ["sum of clipped embeddings (sensitivity C)", "count (sensitivity 1)"],
                      "split": "per example, salted hash of its pixels and label (public salt)"},
            "search_space": {"fixed": space.fixed, "search": space.search},
            "selected": selected,
        },
        "not_covered": "the search space, the trial distribution and the score settings are public (chosen without the "
                       "private data); the search's running time grows with the secret trial count",
    })
    return record


def export_best(best_dir: Path, out: Path, plan, score_config, space, selected: dict) -> dict:
    """Copy the best trial's files into `out`, then write privacy.json and the model card for the search."""
    from dpdiff.hub import write_model_card
    from dpdiff.tuning.search import NOT_EXPORTED

    for item in best_dir.iterdir():
        if item.name in NOT_EXPORTED:
            continue
        target = out / item.name
        # shutil.copy, not copy2: the files get the export's time; the trial's own times would tell how long the
        # search ran after the best trial, i.e. something about the secret count
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True, copy_function=shutil.copy)
        else:
            shutil.copy(item, target)
    trial = json.loads((best_dir / "privacy.json").read_text())
    _replay_config(out / TRAINING_CONFIG, out, trial["epsilon"])
    record = search_record(trial, plan, score_config, space, selected)
    write_json(out / "privacy.json", record)
    license_ = "apache-2.0" if record.get("base_model") == "dpdiff-tiny" else "other"
    card = write_model_card(out, license=license_)
    write_text(card, search_card(card.read_text(encoding="utf-8"), record))
    return record


def _replay_config(path: Path, out: Path, trial_epsilon: float) -> None:
    """The selected trial's flags, without its private folder name (the trial's index would bound the count) and with
    its own epsilon as the target, so that `dpdiff finetune --config` trains it again with (about) its sigma."""
    if not path.is_file():
        return
    flags = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    flags.update(output_dir=str(out), target_epsilon=float(trial_epsilon))
    header = ("# the selected trial of a `dpdiff tune` search: `--config` this file trains it again alone (its target_epsilon is "
              "that trial's own; the search's total guarantee is in privacy.json)\n")
    write_text(path, header + yaml.safe_dump(flags, sort_keys=True))


def search_card(text: str, record: dict) -> str:
    """The card's 'tuning is not covered' bullet becomes what the search covers."""
    s = record["search"]
    count = (f"{s['trial_count']} DP fine-tuning trials (a public count)" if s["method"] == "composition" else
             f"a secret, random number of DP fine-tuning trials ({s['distribution']}, mean {s['mean_trials']:g})")
    selection = "composition of every trial" if s["method"] == "composition" else "repeat-and-select, Papernot & Steinke 2022"
    covered = (
        f"- **Covered: the hyperparameter search.** These weights are the best of {count}, each with hyperparameters drawn from a "
        "public search space and compared by a score that read the private data only through one Gaussian release "
        "(a held-out validation split's mean embedding). The ε above covers the release, every trial and the "
        f"selection ({selection}). Public: the search space, the trial distribution and the score settings (privacy.json, "
        "`search`). Never published: the other trials and their scores"
        + ("." if s["method"] == "composition" else ", nor the trial count.")
    )
    new, found = NOT_COVERED_TUNING.subn(covered, text)
    return new if found else text.rstrip("\n") + "\n\n" + covered + "\n"
