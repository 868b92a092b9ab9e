"""benchmarks/dp_overhead.py's quick path runs end to end on one tiny family row (and the GPU rows'
code path, scaled down, on CPU) and gives finite DP / non-DP ratios; benchmarks/gpu_check.sh parses."""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "dp_overhead.py"
RATIOS = ("time_ratio", "ratio_min", "ratio_max", "mem_ratio", "t_plain", "t_dp")


def load_script():
    """The script as a module, in this process (a subprocess would pay torch's and diffusers' imports again)."""
    spec = importlib.util.spec_from_file_location("dp_overhead_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def run_rows(script, plan):
    torch.set_num_threads(1)
    for row in plan:
        row["pairs"] = 1
    return script.run(plan, warmup=0, device="cpu", memory_steps=1, exact_rss=False)  # keep glibc's default here


def check_finite(rows):
    assert rows
    for row in rows:
        assert "error" not in row, row
        for key in RATIOS:
            assert math.isfinite(row[key]) and (row[key] > 0 or key == "mem_ratio" and row[key] >= 0), (key, row)


def test_quick_family_row_gives_finite_ratios(script):
    rows = run_rows(script, script.cpu_plan(quick=True, patterns=["family:dit/lora/auto/fp32"]))
    check_finite(rows)
    assert rows[0]["mode_ran"] == "fused" and rows[0]["batch"] == 16


def test_profile_attributes_the_dp_steps_extra_time_to_ops(script, capsys):
    torch.set_num_threads(1)
    rows = script.profile(script.cpu_plan(quick=True, patterns=["family:dit*"]), "family:dit/lora/auto/fp32", "cpu", steps=1)
    ops = {op: (delta, plain, dp, plain_calls, dp_calls) for op, delta, plain, dp, plain_calls, dp_calls in rows}
    # the DP step forms per-example products (bmm) and draws the privacy noise (one more normal_ than the
    # diffusion noise both steps draw); the plain step forms no per-example product
    assert ops["aten::bmm"][3] == 0 and ops["aten::bmm"][4] > 0 and ops["aten::bmm"][0] > 0
    assert ops["aten::normal_"][4] > ops["aten::normal_"][3]
    assert all(abs(delta - (dp - plain)) < 1e-9 for delta, plain, dp, _, _ in ops.values())
    assert "ops by |DP - non-DP|" in capsys.readouterr().out


def test_gpu_rows_dry_run_on_cpu(script):
    rows = run_rows(script, script.gpu_plan(["dit:8:2"], ["lora"], ["fp32"], "cpu", tiny=True, pairs=1))
    check_finite(rows)
    assert rows[0]["images_per_s_dp"] > 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


def test_memory_is_measured_by_a_fresh_process_with_rss_following_the_step(script):
    """The CPU memory pass runs in a child process (glibc returning freed blocks from its start); its rows
    come back in plan order beside the in-process timings, and the preset's DP step has a working set RSS sees."""
    torch.set_num_threads(1)
    plan = script.cpu_plan(quick=True, patterns=["family:dit/lora/auto/fp32", "preset/lora/fused/fp32"])
    for row in plan:
        row["pairs"] = 1
    rows = script.run(plan, warmup=0, device="cpu", memory_steps=1, exact_rss=True)
    check_finite(rows)
    assert [r["group"] for r in rows] == ["preset", "family:dit"]
    assert rows[0]["mem_dp_mb"] > 20 and rows[0]["mem_plain_mb"] > 20  # ~46 MiB; measured in this grown heap: 2-6
