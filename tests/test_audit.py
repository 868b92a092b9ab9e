"""The empirical audit: the one-run lower bound's math on synthetic guesses, and two real audits of the
DP engine on a small UNet: without noise the attack wins (the audit has power), with the planned
noise its lower bound stays below the claimed epsilon."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from dpdiff.audit import (
    add_arguments,
    count_correct,
    epsilon_lower_bound,
    format_table,
    guesses_from_scores,
    one_run_p_value,
    run_audit,
)


def test_all_correct_bound_matches_closed_form_and_grows_with_m():
    # delta = 0 and all r guesses right: p = q^r, so eps = logit(beta^(1/r))
    bounds = []
    for m in (8, 32, 100, 1000):
        q = 0.05 ** (1 / m)
        assert epsilon_lower_bound(m, m, m, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
        bounds.append(epsilon_lower_bound(m, m, m, 1e-5, 0.95))
    assert bounds == sorted(bounds) and bounds[0] > 0.7 and bounds[-1] > 5.7  # measured 0.789 ... 5.782


def test_delta_only_loosens_the_bound():
    assert epsilon_lower_bound(100, 100, 90, 1e-3) < epsilon_lower_bound(100, 100, 90, 1e-6) < epsilon_lower_bound(100, 100, 90, 0.0)
    assert one_run_p_value(100, 100, 90, 1.0, 1e-3) > one_run_p_value(100, 100, 90, 1.0, 0.0)


def test_chance_guesses_give_zero_and_the_false_positive_rate_is_at_most_beta():
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5) == 0.0
    assert epsilon_lower_bound(10, 0, 0, 1e-5) == 0.0
    rng = np.random.default_rng(0)
    positives = 0
    for _ in range(200):  # guesses independent of membership: the null of any epsilon >= 0 holds
        membership = rng.random(200) < 0.5
        made, correct = count_correct(guesses_from_scores(rng.random(200), 100), membership)
        positives += epsilon_lower_bound(200, made, correct, 1e-5, 0.95) > 0
    assert positives <= 0.05 * 200 + 8  # binomial slack (measured: 11 of 200)


def test_guesses_split_top_and_bottom():
    g = guesses_from_scores(np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.4]), 4)
    assert g.tolist() == [1, -1, 0, 1, -1, 0]
    assert count_correct(g, np.array([True, False, True, False, False, True])) == (4, 3)


def audit_argv(base, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(base), "--output_dir", str(out), "--dataset", "fashion_mnist",
        "--max_train_samples", "8", "--num_canaries", "32", "--batch_size", "20", "--physical_batch_size", "20",
        "--max_steps", "30", "--audit_seed", "7", "--privacy_seed", "3", "--delta", "1e-3", *extra,
    ]


def audit_args(base, out, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(audit_argv(base, out, *extra))


@pytest.fixture(scope="module")
def small_pipeline_dir(tmp_path_factory):
    """The preset's shape with a narrower UNet (16/32 channels): the audit trains 2 x 30 steps."""
    from dpdiff.pipelines.preset import build_tiny_pipeline, build_tiny_unet

    pipe = build_tiny_pipeline(["a photo of a digit 0", "a photo of a bear"], seed=0)
    pipe.vae.register_to_config(scaling_factor=1.0)
    pipe.register_modules(unet=build_tiny_unet(0, block_out_channels=(16, 32), attention_head_dim=4))
    path = tmp_path_factory.mktemp("audit") / "small-sd"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def test_non_private_run_is_caught(small_pipeline_dir, tmp_path):
    result = run_audit(audit_args(small_pipeline_dir, tmp_path / "np", "--non_private", "--max_grad_norm", "1e6"))
    assert result.noise_multiplier == 0 and math.isinf(result.epsilon_claimed)
    # measured: 31 / 32 correct, epsilon_lower 1.756 (the most 32 canaries can show at 95%: 2.32)
    assert result.num_correct >= 29 and result.epsilon_lower > 1.2, format_table(result)
    saved = json.loads((tmp_path / "np" / "audit.json").read_text())
    assert saved["epsilon_claimed"] == "inf" and saved["num_correct"] == result.num_correct


def test_dp_run_lower_bound_stays_below_its_claim(small_pipeline_dir, tmp_path, capsys):
    from dpdiff.cli import main

    rc = main(["audit", *audit_argv(small_pipeline_dir, tmp_path / "dp", "--target_epsilon", "1.0")])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "dp" / "audit.json").read_text())
    assert 0 < result["epsilon_claimed"] <= 1.0 and result["noise_multiplier"] > 0
    # same canaries, data and steps as the non-private run; measured: epsilon_lower 0.0 (15 / 32 correct, sigma 12.4)
    assert result["epsilon_lower"] <= result["epsilon_claimed"] and result["consistent"], printed
    assert rc == 0 and "empirical lower bound (95% confidence)" in printed and "consistent" in printed


def test_an_engine_that_adds_too_little_noise_is_refuted(small_pipeline_dir, tmp_path, monkeypatch, capsys):
    """Fault injection: the run claims epsilon 1 but the engine uses 1/1000 of the planned noise (the
    kind of bug the audit exists for). Clipping still works, yet the canaries give the bug away."""
    from dpdiff.cli import main
    from dpdiff.privacy import engine

    real_init = engine.DPDiffusionEngine.__init__

    def buggy_init(self, *args, noise_multiplier, **kwargs):
        real_init(self, *args, noise_multiplier=noise_multiplier / 1000, **kwargs)

    monkeypatch.setattr(engine.DPDiffusionEngine, "__init__", buggy_init)
    rc = main(["audit", *audit_argv(small_pipeline_dir, tmp_path / "bug", "--target_epsilon", "1.0")])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "bug" / "audit.json").read_text())
    # measured: 31 / 32 correct, epsilon_lower 1.756 > claimed 1.000 (the table still shows the planned sigma 12.4)
    assert rc == 1 and "REFUTED" in printed and not result["consistent"], printed
    assert result["epsilon_lower"] > result["epsilon_claimed"] == pytest.approx(1.0, abs=0.01)


def test_bad_audit_options_stop_before_any_work(small_pipeline_dir, tmp_path, capsys):
    from dpdiff.cli import main

    for extra, message in ((["--num_guesses", "33"], "--num_guesses must be in 1..32"),
                           (["--target_epsilon", "0"], "target epsilon must be a finite number > 0"),
                           (["--method", "lora", "--lora_target_modules", "to_q"], "cross-attention key/value")):
        out = tmp_path / extra[0].strip("-")
        rc = main(["audit", *audit_argv(small_pipeline_dir, out, *extra)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, err
        assert not out.exists() or not any(out.iterdir())
