"""`dpdiff tune`'s accounting, trial count and search space, without training: the total is recomputed with
dp-accounting from the numbers alone, the naive composed bound is larger, the calibration is tight, and every bad
config is refused with one clear error."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.dp_event import RepeatAndSelectDpEvent
from dp_accounting.rdp import RdpAccountant

from dpdiff.cli import main
from dpdiff.errors import ConfigError, PrivacyError
from dpdiff.tuning import accounting as ta
from dpdiff.tuning import trials
from dpdiff.tuning.space import parse_space

SHAPES = {"logarithmic": 0.0, "geometric": 1.0, "poisson": math.inf}


def independent_total(record_events: dict, delta: float) -> float:
    """The search's epsilon rebuilt from privacy.json's numbers with dp-accounting only (no dpdiff helper)."""
    ref, rs, score = record_events["trial_reference"], record_events["repeat_and_select"], record_events["score_release"]
    step = dp_event.PoissonSampledDpEvent(ref["sample_rate"], dp_event.GaussianDpEvent(ref["noise_multiplier"]))
    shape = math.inf if rs["shape"] == "inf" else rs["shape"]
    total = dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(score["gaussian_noise_multiplier"]), score["count"]),
        RepeatAndSelectDpEvent(dp_event.SelfComposedDpEvent(step, ref["steps"]), rs["mean"], shape),
    ])
    acc = RdpAccountant()
    acc.compose(total)
    return acc.get_epsilon(delta)


def test_design_facts_reproduce():
    """DESIGN.md: q 0.01, sigma 1, 1000 steps, delta 1e-5."""
    trial = ta.trial_event(1.0, 0.01, 1000)
    assert ta.epsilon_of(trial, 1e-5) == pytest.approx(2.10, abs=0.005)
    assert ta.naive_epsilon(1.0, 0.01, 1000, 10, 1e-5) == pytest.approx(6.71, abs=0.005)
    for name, expected in (("logarithmic", 3.52), ("geometric", 4.10), ("poisson", 4.33)):
        assert ta.epsilon_of(ta.search_event(trial, 10, SHAPES[name], None), 1e-5) == pytest.approx(expected, abs=0.005)


@pytest.mark.parametrize("target,mean,distribution,profiles,naive_larger", [
    (10.0, 10, "logarithmic", [(256 / 54000, 2110)], True),
    (1.0, 10, "poisson", [(0.01, 300)], True),
    (8.0, 4, "poisson", [(0.02, 100), (0.01, 200)], True),
    # few trials at a small epsilon: composing a fixed count is cheaper (docs/privacy.md), and the test says so
    (4.0, 4, "geometric", [(0.01, 300)], False),
])
def test_calibrated_search_meets_target_is_tight_and_compares_with_naive_composition(target, mean, distribution, profiles,
                                                                                    naive_larger):
    plan = ta.calibrate(target, 1e-5, profiles, distribution, mean, score_epsilon_share=0.1)
    record = plan.to_dict()
    events = {"trial_reference": record["profiles"][plan.reference], "repeat_and_select": {"mean": mean, "shape": record["shape"]},
              "score_release": {"gaussian_noise_multiplier": plan.score_noise_multiplier, "count": 2}}
    total = independent_total(events, 1e-5)
    assert total == pytest.approx(plan.epsilon, rel=1e-9) and total <= target
    # tight: 1% less noise per trial would overspend
    ref = plan.profiles[plan.reference]
    lower = ta.epsilon_of(ta.search_event(ta.trial_event(ref.noise_multiplier * 0.99, ref.sample_rate, ref.steps), mean,
                                          plan.shape, ta.score_event(plan.score_noise_multiplier)), 1e-5)
    assert lower > target
    # composing ceil(mean) trials with the same sigma (as if the count were fixed and public) states more
    assert (plan.naive_epsilon > plan.epsilon) == naive_larger
    assert plan.single_trial_epsilon < plan.epsilon


def test_every_profile_lies_below_the_reference_at_every_order_and_its_sigma_is_minimal():
    plan = ta.calibrate(8.0, 1e-5, [(0.02, 100), (0.01, 200), (0.01, 50)], "geometric", 3)
    ref = plan.profiles[plan.reference]
    _, ref_curve = ta.rdp_curve(ta.trial_event(ref.noise_multiplier, ref.sample_rate, ref.steps))
    for p in plan.profiles:
        _, curve = ta.rdp_curve(ta.trial_event(p.noise_multiplier, p.sample_rate, p.steps))
        assert np.all(curve <= ref_curve * (1 + 1e-12))
        if p is not ref:
            assert not ta.dominates(ref_curve, p.noise_multiplier * 0.99, p.sample_rate, p.steps)


def test_unreachable_target_is_refused_with_a_reason():
    # hiding the count costs about (log(mean) + log(1/delta)) / (order - 1) however much noise: ~0.018 at mean 1000
    with pytest.raises(PrivacyError, match="the search cannot reach epsilon .* lower the mean"):
        ta.calibrate(0.015, 1e-5, [(0.01, 1000)], "poisson", 1000, score_epsilon_share=0.5)


@pytest.mark.parametrize("name", list(SHAPES))
def test_trial_count_sampler_follows_its_distribution(name):
    mean = 3.0
    assert sum(trials.pmf(name, mean, k) for k in range(400)) == pytest.approx(1.0, abs=1e-9)
    assert sum(k * trials.pmf(name, mean, k) for k in range(400)) == pytest.approx(mean, rel=1e-6)
    # inverse CDF at fixed uniforms: K = k exactly when u falls in (F(k-1), F(k)]
    cdf = np.cumsum([trials.pmf(name, mean, k) for k in range(60)])
    for u in (0.001, 0.2, 0.5, 0.77, 0.999):
        assert trials.draw_count(name, mean, uniform=u) == int(np.searchsorted(cdf, u))
    draws = [trials.draw_count(name, mean) for _ in range(4000)]
    assert statistics.mean(draws) == pytest.approx(mean, rel=0.1)
    assert (min(draws) >= 1) == (name != "poisson")


def test_secret_draw_comes_from_the_os_csprng(monkeypatch):
    import torch

    calls = []

    def fake(count):
        calls.append(count)
        return torch.tensor([0.5], dtype=torch.float64)

    monkeypatch.setattr(trials, "secure_uniform", fake)
    assert trials.draw_count("geometric", 2) == 1 and calls == [1]


@pytest.mark.parametrize("name,mean,match", [("uniform", 3, "unknown trial distribution"), ("poisson", 0.5, "mean"),
                                             ("logarithmic", 1, "nothing random"), ("geometric", "3", "number")])
def test_bad_trial_distribution_is_refused(name, mean, match):
    with pytest.raises(ConfigError, match=match):
        trials.check_distribution(name, mean)


GOOD = {"fixed": {"batch_size": 16}, "search": {"learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
                                               "max_steps": [2, 3], "rank": [4, 8]},
        "trials": {"distribution": "geometric", "mean": 2}, "score": {"validation_fraction": 0.2}}


def test_space_draws_and_profiles():
    space = parse_space(json.loads(json.dumps(GOOD)))
    assert space.profile_flags() == [{"batch_size": 16, "epochs": None, "max_steps": 2},
                                     {"batch_size": 16, "epochs": None, "max_steps": 3}]
    drawn = space.draw(uniforms=[0.5, 0.99, 0.1])  # sorted names: learning_rate, max_steps, rank
    assert drawn == {"learning_rate": pytest.approx(math.sqrt(1e-5)), "max_steps": 3, "rank": 4}
    for _ in range(20):
        d = space.draw()
        assert 1e-3 <= d["learning_rate"] <= 1e-2 and d["max_steps"] in (2, 3) and d["rank"] in (4, 8)


@pytest.mark.parametrize("change,match", [
    ({"fixed": {"target_epsilon": 3}}, "set by `dpdiff tune` itself"),
    ({"search": {"learning_rat": [1e-3]}}, "not a finetune flag"),
    ({"search": {"epochs": {"low": 1, "high": 3}}}, "must be a list"),
    ({"search": {"dataset": ["mnist5k", "fashion_mnist"]}}, "cannot be searched"),
    ({"search": {"rank": []}}, "empty list"),
    ({"search": {"rank": ["eight"]}}, "rank"),
    ({"search": {"learning_rate": {"low": 1e-2, "high": 1e-3}}}, "low < high"),
    ({"trials": {"distribution": "poisson"}}, "distribution .* and mean"),
    ({"score": {"validation_fraction": 1.5}}, "validation_fraction"),
    ({"score": {"epsilon_shares": 0.1}}, "unknown key"),
    ({"extra": {}}, "unknown section"),
    ({"fixed": {"train_batch_size": 8}}, "write 'batch_size'"),
])
def test_bad_search_config_is_refused_before_any_work(change, match):
    raw = json.loads(json.dumps(GOOD))
    for section, values in change.items():
        raw[section] = values if section == "trials" else {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=match):
        parse_space(raw)


def test_budget_prints_what_a_search_costs(tmp_path, capsys):
    import yaml

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "fixed": {"batch_size": 256}, "search": {"epochs": [1, 2]},
                                    "trials": {"distribution": "logarithmic", "mean": 4}}))
    assert main(["budget", "--epsilon", "10", "--num-examples", "60000", "--tune", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epsilon"] <= 10 < result["naive_epsilon"]
    assert result["expected_training_examples"] == 48000 and len(result["profiles"]) == 2
    # at mean 4 and epsilon 10 hiding the count is cheaper than composing 4 public trials (docs/privacy.md's table)
    assert result["fixed_count_reference_sigma"] > result["profiles"][result["reference"]]["noise_multiplier"]
    assert main(["budget", "--noise-multiplier", "1", "--num-examples", "60000", "--tune", str(path)]) == 2
    assert "give --epsilon" in capsys.readouterr().err
    assert main(["budget", "--epsilon", "1", "--sample-rate", "0.01"]) == 2  # without --tune a length is still needed
    assert "--steps or --epochs" in capsys.readouterr().err


def test_shipped_search_config_parses():
    from pathlib import Path

    from dpdiff.tuning.space import load_space

    space = load_space(Path(__file__).resolve().parent.parent / "recipes" / "configs" / "tune_lora.yaml")
    assert space.distribution == "logarithmic" and len(space.profile_flags()) == 1


def test_fixed_count_is_public_and_plainly_composed():
    plan = ta.calibrate(4.0, 1e-5, [(0.01, 300)], "fixed", 3)
    assert plan.shape is None and trials.draw_count("fixed", 3) == 3
    ref = plan.profiles[0]
    assert plan.epsilon == pytest.approx(ta.naive_epsilon(ref.noise_multiplier, 0.01, 300, 3, 1e-5, plan.score_noise_multiplier))
    with pytest.raises(ConfigError, match="whole number"):
        trials.check_distribution("fixed", 2.5)
