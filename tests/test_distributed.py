"""Two CPU processes (gloo) started the way a user starts them: `accelerate launch --multi_gpu`.

(`accelerate launch --cpu --num_processes 2` silently starts ONE process, so the world size is
asserted.) The script compares every distributed step with a single-process replay."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "ddp_engine.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
# LoRA on the preset-shaped UNet and on a packed flow-matching DiT; the UNet's attention blocks, where the
# 4x4 level's layers keep factored (book-keeping) per-example gradients
@pytest.mark.parametrize("family_build, method", [(None, "lora"), ("flux", "lora"), (None, "attention")])
def test_two_processes_match_one_and_stay_identical(tmp_path, family_build, method):
    out = tmp_path / "result.json"
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(SCRIPT), str(out), family_build or "unet", method]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["same_start"]  # DPDDP broadcast rank 0's LoRA init over a different one on rank 1
    assert result["update_norm"] > 1e-4  # the steps did move the parameters
    assert result["max_diff_vs_single"] < 1e-6
    assert result["identical_across_ranks"]
    assert result["counts"][3] == [2, 0]  # the step where rank 1 had an empty share (and did not hang)
    assert sum(sum(c) for c in result["counts"][:3]) > 0
    # noise drawn once per step in total; twice (every rank) would give sqrt(2)
    assert result["noise_std_over_sigma_c"] == pytest.approx(1.0, rel=0.05)
    assert result["noisy_identical_across_ranks"]
    assert result["state_ranks"] == 2
