"""`dpdiff budget` through the real dispatcher, and once as a separate process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpdiff.cli import main
from dpdiff.privacy.accounting import epsilon_for, noise_multiplier_for

REPO = Path(__file__).resolve().parents[1]
Q = 256 / 60000


def run_json(capsys, *args):
    assert main(["budget", *args, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object
    return json.loads(out)


def test_noise_multiplier_to_epsilon(capsys):
    result = run_json(capsys, "--noise-multiplier", "1.0", "--batch-size", "256", "--num-examples", "60000", "--steps", "1000")
    for key in ("noise_multiplier", "epsilon", "delta", "sample_rate", "steps", "accountant"):
        assert key in result
    assert result["sample_rate"] == Q and result["steps"] == 1000 and result["delta"] == 1e-5
    assert result["epsilon"] == epsilon_for(1.0, Q, 1000, 1e-5) == pytest.approx(0.738, abs=1e-3)
    rdp = run_json(capsys, "--noise-multiplier", "1.0", "--sample-rate", str(Q), "--steps", "1000", "--accountant", "rdp")
    assert rdp["accountant"] == "rdp" and rdp["epsilon"] == pytest.approx(1.098, abs=1e-3)


def test_epsilon_to_noise_multiplier_with_epochs(capsys):
    result = run_json(capsys, "--epsilon", "2", "--batch-size", "100", "--num-examples", "10000", "--epochs", "3")
    assert result["steps"] == 300 and result["sample_rate"] == 0.01
    assert result["noise_multiplier"] == noise_multiplier_for(2.0, 0.01, 300, 1e-5)
    assert result["epsilon"] <= 2.0
    assert result["epsilon"] == epsilon_for(result["noise_multiplier"], 0.01, 300, 1e-5)


def test_text_output(capsys):
    assert main(["budget", "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "100"]) == 0
    out = capsys.readouterr().out
    assert f"{epsilon_for(1.0, 0.01, 100, 1e-5):.4f}" in out
    assert "delta < 1/n not checked" in out  # q alone cannot check the 1/n rule; say so


@pytest.mark.parametrize(
    "args, message",
    [
        (["--noise-multiplier", "1", "--batch-size", "5", "--num-examples", "500", "--steps", "10", "--delta", "0.002"],
         "delta=0.002 >= 1/n=1/500"),
        (["--noise-multiplier", "1", "--sample-rate", "0.01", "--batch-size", "5", "--steps", "10"], "either --sample-rate"),
        (["--noise-multiplier", "1", "--batch-size", "5", "--steps", "10"], "--num-examples"),
        (["--noise-multiplier", "1", "--batch-size", "600", "--num-examples", "500", "--steps", "10"], "exceed 1"),
        (["--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "10"], "--sample-rate must be in (0, 1]"),
        (["--noise-multiplier", "0", "--sample-rate", "0.01", "--steps", "10"], "must be > 0"),
        (["--noise-multiplier", "nan", "--sample-rate", "0.01", "--steps", "10"], "noise_multiplier"),
        (["--epsilon", "nan", "--sample-rate", "0.01", "--steps", "10"], "finite number > 0"),
        (["--epsilon", "-1", "--sample-rate", "0.01", "--steps", "10"], "finite number > 0"),
        (["--epsilon", "0.001", "--sample-rate", "0.01", "--steps", "1000"], "cannot be reached"),
        (["--epsilon", "1", "--sample-rate", "0.01", "--steps", "0"], "--steps must be >= 1"),
        (["--epsilon", "1", "--sample-rate", "0.01", "--epochs", "0"], "epochs"),
        (["--epsilon", "1", "--sample-rate", "0.01", "--steps", "10", "--delta", "0"], "delta must be in (0, 1)"),
    ],
)
def test_bad_input_exits_2_with_message(capsys, args, message):
    assert main(["budget", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("dpdiff budget: error: ")
    assert message in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    "args",
    [
        ["--sample-rate", "0.01", "--steps", "10"],  # neither --epsilon nor --noise-multiplier
        ["--epsilon", "1", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "10"],
        ["--epsilon", "1", "--sample-rate", "0.01", "--steps", "10", "--epochs", "1"],
        ["--epsilon", "1", "--sample-rate", "0.01", "--steps", "10", "--accountant", "gdp"],
    ],
)
def test_argparse_level_errors_exit_2(capsys, args):
    with pytest.raises(SystemExit) as exc:
        main(["budget", *args])
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_force_delta_allows_large_delta(capsys):
    with pytest.warns(UserWarning, match="forced"):
        result = run_json(
            capsys, "--noise-multiplier", "1", "--batch-size", "5", "--num-examples", "500", "--steps", "10",
            "--delta", "0.002", "--force-delta",
        )
    assert result["delta"] == 0.002 and math.isfinite(result["epsilon"])


def test_installed_command():
    script = Path(sys.executable).with_name("dpdiff")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dpdiff.cli"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    ok = subprocess.run(
        [*command, "budget", "--noise-multiplier", "1.0", "--sample-rate", str(Q), "--steps", "1000", "--json"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["epsilon"] == pytest.approx(0.738, abs=1e-3)
    bad = subprocess.run(
        [*command, "budget", "--epsilon", "1", "--batch-size", "5", "--num-examples", "500", "--steps", "10",
         "--delta", "0.01"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert bad.returncode == 2
    assert "1/n=1/500" in bad.stderr and "Traceback" not in bad.stderr
