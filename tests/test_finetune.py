"""End-to-end DP fine-tuning on a small private subset: what a run leaves, that the adapter loads
in a stock pipeline, that a killed run resumes to the same ledger, and that bad setups stop early."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from dpdiff.config import parse_with_config
from dpdiff.errors import ConfigError, PrivacyError
from dpdiff.privacy.accounting import epsilon_for
from dpdiff.training.arguments import add_finetune_arguments, replayable_flags
from dpdiff.training.loop import finetune
from helpers import to_argv

ROOT = Path(__file__).resolve().parent.parent


def small_run_flags(base, out, **extra):
    flags = {
        "pretrained_model_name_or_path": str(base), "output_dir": str(out), "dataset": "fashion_mnist",
        "max_train_samples": 64, "batch_size": 16, "physical_batch_size": 8, "max_steps": 4,
        "delta": 1e-3, "target_epsilon": 8.0, "num_inference_steps": 2, "checkpointing_steps": 2,
        "privacy_seed": 1234, "seed": 0,
    }
    flags.update(extra)
    return to_argv(flags)


def parse(argv, method="lora"):
    return add_finetune_arguments(argparse.ArgumentParser(), method=method).parse_args(argv)


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    h = torch.randn(2, 32, 64, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([10, 500]), encoder_hidden_states=h).sample


@pytest.fixture
def ran_with(monkeypatch):
    """What the run's engine actually ran with, read at every step from the objects that draw the sample and the
    noise and clip: the Poisson sampler's rate and size, the DP optimizer's sigma, C and divisor."""
    import dpdiff.training.loop as loop

    steps = []

    class Recording(loop.DPDiffusionEngine):
        def step(self):
            opt, sampler = self.optimizer, self._sampler
            steps.append({"noise_multiplier": opt.noise_multiplier, "max_grad_norm": opt.max_grad_norm,
                          # secure mode samples from the OS CSPRNG at the engine's rate, else with its sampler
                          "sample_rate": self.sample_rate if self.secure_mode else sampler.sample_rate,
                          "num_samples": len(self.shard) if self.secure_mode else sampler.num_samples,
                          "expected_batch_size": opt.expected_batch_size, "clipping": self.clipping,
                          "noise_multiplicity": self.noise_multiplicity, "world_size": self.world_size})
            return super().step()

    monkeypatch.setattr(loop, "DPDiffusionEngine", Recording)
    return steps


def check_record_against_engine(privacy: dict, steps: list[dict], out: Path) -> None:
    """privacy.json states the (sigma, C, q, T) the engine ran with; its epsilon is the accountant's for them."""
    assert len(steps) == privacy["steps"] == privacy["ledger"]["steps"]
    ran = steps[0]
    assert all(step == ran for step in steps)  # one (sigma, C, q) for the whole run, as the ledger composes
    assert ran["noise_multiplier"] == privacy["noise_multiplier"] > 0
    assert ran["max_grad_norm"] == privacy["max_grad_norm"]
    assert ran["sample_rate"] == privacy["sample_rate"] and ran["num_samples"] == privacy["num_examples"]
    assert ran["expected_batch_size"] == pytest.approx(ran["sample_rate"] * ran["num_samples"])
    assert (ran["clipping"], ran["noise_multiplicity"], ran["world_size"]) == (
        privacy["clipping"], privacy["noise_multiplicity"], privacy["world_size"])
    assert privacy["ledger"]["history"] == [[ran["noise_multiplier"], ran["sample_rate"], len(steps)]]
    assert privacy["epsilon"] == pytest.approx(
        epsilon_for(ran["noise_multiplier"], ran["sample_rate"], len(steps), privacy["delta"], privacy["accountant"]), rel=1e-9)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    if checkpoints:  # what a resume would continue with: the same settings
        from dpdiff.training.checkpoint import load_checkpoint

        saved = load_checkpoint(checkpoints[-1])[1]["engine"]["config"]
        assert saved == {k: ran[k] for k in saved}


def test_lora_run_leaves_adapter_that_stock_pipeline_loads(tiny_pipeline_dir, tmp_path, ran_with):
    out = tmp_path / "run"
    args = parse(small_run_flags(tiny_pipeline_dir, out, rank=4, lora_alpha=8, prompt_template="{class_name}, item {label}",
                                 timestep_bias_strategy="later", timestep_bias_multiplier=4))
    result = finetune(args)
    for name in ("pytorch_lora_weights.safetensors", "privacy.json", "README.md", "generation_config.json",
                 "training_config.yaml", "samples.png", "epsilon_curve.png"):
        assert (out / name).is_file(), name
    # the run's flags, resolved defaults included: `--config` of the file alone parses back to this run
    replay = parse_with_config(add_finetune_arguments(argparse.ArgumentParser()), ["--config", str(out / "training_config.yaml")])
    assert replay.learning_rate == 2e-3 and replay.timestep_bias_strategy == "later" and replay.rank == 4
    assert {k: v for k, v in vars(replay).items() if k != "config"} == vars(args)
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["steps"] == 4 and privacy["method"] == "lora" and privacy["num_examples"] == 64
    assert privacy["sample_rate"] == 16 / 64
    # the record states the (sigma, C, q, T) the engine actually used; its epsilon is theirs, and within target
    check_record_against_engine(privacy, ran_with, out)
    assert privacy["epsilon"] <= 8.0
    # checkpoints are not left beside the results forever: only the final ones are published
    assert privacy["lora_rank"] == 4 and privacy["lora_target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert privacy["grad_sample_mode"] == "fused"  # 'auto' with only Linear layers adapted: the mode that ran
    generation = json.loads((out / "generation_config.json").read_text())  # what `dpdiff sample` prompts with
    assert generation["class_prompts"][9] == "ankle boot, item 9"
    card = (out / "README.md").read_text()
    assert "differential-privacy" in card and "LoRA adapters (rank 4) on the UNet layers `to_k`, `to_out.0`" in card

    trained = unet_output(result.pipeline.unet)
    stock = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    base = unet_output(stock.unet)
    stock.load_lora_weights(out)
    loaded = unet_output(stock.unet)
    assert torch.allclose(loaded, trained, atol=1e-5), (loaded - trained).abs().max()
    assert (loaded - base).abs().max() > 1e-4


def test_replayable_flags_are_the_recipe_flags_only(tmp_path):
    args = parse(["--output_dir", str(tmp_path), "--hub_token", "hf_x", "--push_to_hub", "--lora_target_modules", "to_q", "conv1"])
    args.command, args.output_dir = "finetune", tmp_path  # `dpdiff finetune` adds its subcommand; a caller may pass a Path
    flags = replayable_flags(args)
    assert "command" not in flags and "hub_token" not in flags and "push_to_hub" not in flags
    assert flags["output_dir"] == str(tmp_path) and flags["lora_target_modules"] == ["to_q", "conv1"]
    assert "learning_rate" not in flags  # None (not resolved yet) is left to the default


def test_attention_run_saves_unet(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "attn"
    result = finetune(parse(small_run_flags(tiny_pipeline_dir, out, max_steps=2, attention_start_index=1), method="attention"))
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert torch.allclose(unet_output(unet), unet_output(result.pipeline.unet), atol=1e-6)
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    changed = [n for (n, p), q in zip(unet.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert changed and all(".attentions." in n for n in changed)
    assert not any(n.startswith("down_blocks.0.attentions") for n in changed)  # before the start index


def test_non_empty_output_dir_refused_then_overwritten(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "old.txt").write_text("results of another run")
    with pytest.raises(ConfigError, match="not empty"):
        finetune(parse(small_run_flags(tiny_pipeline_dir, out)))
    assert sorted(os.listdir(out)) == ["old.txt"]  # nothing written


@pytest.mark.parametrize(
    "extra,error,match",
    [
        ({"physical_batch_size": 32}, ConfigError, "physical_batch_size"),
        ({"delta": 0.05}, PrivacyError, "1/n"),
        ({"target_epsilon": -1}, PrivacyError, "epsilon"),
        ({"lora_target_modules": "to_nothing"}, ConfigError, "to_nothing"),
    ],
)
def test_bad_setups_stop_before_training(tiny_pipeline_dir, tmp_path, extra, error, match):
    out = tmp_path / "bad"
    with pytest.raises(error, match=match):
        finetune(parse(small_run_flags(tiny_pipeline_dir, out, **extra)))
    assert not (out / "privacy.json").exists() and not (out / "checkpoints").exists()


def _launch(base, out, extra=()):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "finetune_lora.py"),
           *small_run_flags(base, out, max_steps=8), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_ledger_and_weights(tiny_pipeline_dir, tmp_path):
    """SIGKILL after the first checkpoint, resume with `latest`: same steps, epsilon and weights as
    an uninterrupted run, and no half-written file in the output folder."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = _launch(tiny_pipeline_dir, full)
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log

    proc = _launch(tiny_pipeline_dir, killed)
    deadline = time.time() + 900
    while not (killed / "checkpoints" / "checkpoint-2").is_dir():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "privacy.json").exists()
    leftovers = [p.name for p in killed.iterdir() if p.name.startswith(".")]
    assert not [n for n in leftovers if not n.endswith(".tmp")]  # only temp names, never a partial result

    proc = _launch(tiny_pipeline_dir, killed, ["--resume_from_checkpoint", "latest"])
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log
    a = json.loads((full / "privacy.json").read_text())
    b = json.loads((killed / "privacy.json").read_text())
    assert a["steps"] == b["steps"] == 8
    assert a["ledger"]["history"] == b["ledger"]["history"]
    assert a["epsilon"] == b["epsilon"]
    wa = load_file(full / "pytorch_lora_weights.safetensors")
    wb = load_file(killed / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_changed_privacy_settings(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    finetune(parse(small_run_flags(tiny_pipeline_dir, out, checkpointing_steps=2, max_steps=3)))
    with pytest.raises(PrivacyError, match="different privacy settings"):
        finetune(parse(small_run_flags(tiny_pipeline_dir, out, max_steps=3, max_grad_norm=0.5,
                                       resume_from_checkpoint="latest")))


def test_corrupt_checkpoint_is_named(tiny_pipeline_dir, tmp_path):
    from dpdiff.errors import IntegrityError

    out = tmp_path / "run"
    finetune(parse(small_run_flags(tiny_pipeline_dir, out, max_steps=5, checkpointing_steps=2)))
    newest = out / "checkpoints" / "checkpoint-4" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(IntegrityError, match="checkpoint-4.*corrupt.*checkpoint-2"):
        finetune(parse(small_run_flags(tiny_pipeline_dir, out, max_steps=5, resume_from_checkpoint="latest")))


def test_mixed_precision_bf16_run_records_its_precision_and_keeps_the_guarantee(tiny_pipeline_dir, tmp_path, monkeypatch,
                                                                                ran_with):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION: the engine then runs the
    forward/backward under bf16 autocast with fp32 per-example gradients, clipping and noise."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)  # a process-wide singleton: earlier runs in this process set "no"
    out = tmp_path / "run"
    try:
        result = finetune(parse(small_run_flags(tiny_pipeline_dir, out, rank=4, checkpointing_steps=0)))
    finally:
        AcceleratorState._reset_state(True)
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["precision"] == "bf16" and privacy["grad_sample_mode"] == "fused"
    check_record_against_engine(privacy, ran_with, out)
    # frozen weights in the run's precision, trained ones fp32 master weights (issue 39)
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in result.pipeline.unet.parameters())
    assert any(p.requires_grad for p in result.pipeline.unet.parameters())
    assert all(p.dtype == torch.bfloat16 for p in result.pipeline.vae.parameters())
    assert (out / "pytorch_lora_weights.safetensors").is_file()
