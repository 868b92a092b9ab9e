"""The search space of `dpdiff tune`: one YAML file, public, checked whole before any work.

    fixed:                 # finetune flags every trial shares
      method: lora
      dataset: fashion_mnist
      batch_size: 256
    search:                # finetune flags drawn per trial: a list (uniform choice) or a range
      learning_rate: {low: 5.0e-4, high: 5.0e-3, log: true}
      max_grad_norm: [0.01, 0.05, 0.1]
      epochs: [1, 2]
    trials: {distribution: logarithmic, mean: 4}
    score: {validation_fraction: 0.1, epsilon_share: 0.1, num_samples: 64}

Each trial's configuration is drawn from the OS CSPRNG too: the configurations of losing trials are never
published, and drawing them from a seed anyone holds would let the count be reconstructed. Flags that set a trial's
privacy curve (batch_size, epochs, max_steps) may only be lists, so every (q, steps) a trial can have is known
up front and calibrated (dpdiff/tuning/accounting.py); flags that change the data or the guarantee are refused.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass, field

from dpdiff.config import load_config
from dpdiff.errors import ConfigError
from dpdiff.privacy.secure_random import secure_uniform

SECTIONS = ("fixed", "search", "trials", "score")
# the search states these itself (one total guarantee, one output, one private state)
REFUSED = {"target_epsilon", "delta", "accountant", "force_delta", "output_dir", "overwrite_output_dir",
           "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_token", "dry_run", "config", "report_to"}
# the same data for every trial: the validation split is cut from it once
NOT_SEARCHED = {"dataset", "max_train_samples", "pretrained_model_name_or_path", "resolution", "image_column",
                "caption_column", "prompt_template", "seed", "privacy_seed", "secure_mode"}
PROFILE_FLAGS = ("batch_size", "epochs", "max_steps")  # set (q, steps): lists only


@dataclass
class SearchSpace:
    fixed: dict
    search: dict  # flag -> list | {"low", "high", "log"}
    distribution: str
    mean_trials: float
    score: dict = field(default_factory=dict)

    def profile_flags(self) -> list[dict]:
        """Every combination of the flags that fix a trial's (q, steps)."""
        options = {k: self.search[k] for k in PROFILE_FLAGS if k in self.search}
        combos = [dict(zip(options, values)) for values in itertools.product(*options.values())] or [{}]
        return [{**{k: self.fixed.get(k) for k in PROFILE_FLAGS}, **c} for c in combos]

    def draw(self, uniforms=None) -> dict:
        """One trial's searched flags; `uniforms` (an iterator of floats in (0, 1]) only in tests."""
        u = iter(uniforms) if uniforms is not None else (float(x) for x in secure_uniform(max(1, len(self.search))))
        config = {}
        for name, spec in sorted(self.search.items()):
            x = min(next(u), 1.0 - 1e-12)
            if isinstance(spec, list):
                config[name] = spec[min(int(x * len(spec)), len(spec) - 1)]
            else:
                lo, hi = spec["low"], spec["high"]
                value = math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo))) if spec.get("log") else lo + x * (hi - lo)
                config[name] = int(round(value)) if spec.get("int") else float(value)
        return config


def load_space(path) -> SearchSpace:
    """The search YAML, read and refused like every dpdiff config (`dpdiff.config.load_config`)."""
    return parse_space(load_config(path), str(path))


def parse_space(raw, where: str = "search config") -> SearchSpace:
    """Check every section and every value against the finetune flags; one error naming what is wrong."""
    from dpdiff.training.arguments import add_finetune_arguments
    from dpdiff.tuning.trials import check_distribution

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; the sections are {', '.join(SECTIONS)}")
    fixed, search = raw.get("fixed") or {}, raw.get("search") or {}
    trials, score = raw.get("trials") or {}, raw.get("score") or {}
    for name, section in (("fixed", fixed), ("search", search), ("trials", trials), ("score", score)):
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: section {name!r} must be a mapping")
    if not search:
        raise ConfigError(f"{where}: 'search' is empty: give at least one finetune flag to search over")
    parser = add_finetune_arguments(argparse.ArgumentParser())
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    from dpdiff.training.diffusers_flags import ALIASES

    for name in list(fixed) + list(search):
        if name in ALIASES:  # the search computes each trial's (q, steps) from dpdiff's names, before the loop resolves
            raise ConfigError(f"{where}: write {ALIASES[name][0]!r} (dpdiff's name) instead of diffusers' {name!r} in a search config")
        if name in REFUSED:
            raise ConfigError(f"{where}: {name!r} is set by `dpdiff tune` itself (one total guarantee, one output); "
                              "remove it from the search config")
        if name not in actions:
            raise ConfigError(f"{where}: {name!r} is not a finetune flag (see `dpdiff finetune --help`)")
    both = set(fixed) & set(search)
    if both:
        raise ConfigError(f"{where}: {sorted(both)} both fixed and searched")
    for name, value in fixed.items():
        fixed[name] = _check_value(parser, name, value, f"{where}: fixed.{name}")
    for name, spec in search.items():
        if name in NOT_SEARCHED:
            raise ConfigError(f"{where}: {name!r} cannot be searched (every trial must train on the same data); put it under 'fixed'")
        search[name] = _check_spec(parser, actions[name], spec, f"{where}: search.{name}", profile=name in PROFILE_FLAGS)
    if "distribution" not in trials or "mean" not in trials:
        raise ConfigError(f"{where}: 'trials' needs distribution (poisson | geometric | logarithmic) and mean")
    extra = set(trials) - {"distribution", "mean"}
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {sorted(extra)} in 'trials'")
    distribution, _, mean = check_distribution(trials["distribution"], trials["mean"])
    from dpdiff.tuning.score import ScoreConfig

    ScoreConfig.from_dict(score, where)  # checked now, built again where used
    return SearchSpace(fixed, search, distribution, mean, dict(score))


def _check_value(parser, name: str, value, what: str):
    """Converted and checked as a finetune YAML config's value is (dpdiff.config.validate_config)."""
    from dpdiff.config import validate_config

    return validate_config(parser, {name: value}, what.rsplit(".", 1)[0])[name]


def _check_spec(parser, action, spec, what: str, profile: bool):
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{what}: an empty list has nothing to draw")
        return [_check_value(parser, action.dest, v, what) for v in spec]
    if isinstance(spec, dict):
        if profile:
            raise ConfigError(f"{what}: {action.dest} sets a trial's sample rate or length, so it must be a list "
                              "(each value is calibrated up front), not a range")
        if action.type not in (int, float):
            raise ConfigError(f"{what}: a range needs a numeric flag; give a list of values")
        extra = set(spec) - {"low", "high", "log"}
        if extra or not {"low", "high"} <= set(spec):
            raise ConfigError(f"{what}: a range is {{low, high, log}}; got keys {sorted(spec)}")
        lo, hi = (spec[k] for k in ("low", "high"))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)):
            raise ConfigError(f"{what}: low and high must be numbers, got {lo!r}, {hi!r}")
        log = bool(spec.get("log", False))
        if not lo < hi or (log and lo <= 0):
            raise ConfigError(f"{what}: need low < high{' and low > 0 for a log range' if log else ''}, got {lo}..{hi}")
        return {"low": lo, "high": hi, "log": log, "int": action.type is int}
    raise ConfigError(f"{what}: give a list of values or a range {{low, high, log}}, got {spec!r}")
