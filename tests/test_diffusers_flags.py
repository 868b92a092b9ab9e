"""diffusers' training-script flag names on dpdiff's recipes, `dpdiff finetune` and YAML configs (issue 40):
aliases, their DP meaning in --help, refusals and unknown flags in one line, the physical batch clamp,
fp16 on a CPU, and the noise-to-signal warning. Pure: no model, no data."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpdiff.config import FlagParser, parse_with_config
from dpdiff.errors import ConfigError
from dpdiff.training import diffusers_flags, diffusers_run
from dpdiff.training.arguments import add_finetune_arguments, finetune_args, replayable_flags
from dpdiff.training.loop import check_arguments

ROOT = Path(__file__).resolve().parent.parent


def checked(argv):
    return check_arguments(add_finetune_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_the_issue_command_parses_and_maps_onto_dpdiff_flags():
    args = checked(["--train_data_dir", "/data/mine", "--train_batch_size", "16", "--max_train_steps", "20",
                    "--mixed_precision", "no", "--validation_prompt", "a red chair", "--gradient_accumulation_steps", "4",
                    "--num_validation_images", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "3"])
    assert args.dataset == "imagefolder:/data/mine" and args.batch_size == 16 and args.max_steps == 20
    assert args.physical_batch_size == 4  # 16 expected per logical step, in about 4 micro-batches
    assert args.validation_prompt == ["a red chair"] and args.num_validation_images == 2
    replay = replayable_flags(args)  # training_config.yaml replays with dpdiff's names only
    assert not {"train_data_dir", "train_batch_size", "max_train_steps", "gradient_accumulation_steps"} & set(replay)
    assert replay["batch_size"] == 16 and replay["dataset"] == "imagefolder:/data/mine"
    assert checked(["--dataset_name", "me/set", "--num_train_epochs", "2.5"]).dataset == "me/set"
    assert checked(["--num_train_epochs", "2.5"]).epochs == 2.5


def test_dreambooth_names_caption_every_instance_image():
    args = checked(["--instance_data_dir", "/data/dog", "--instance_prompt", "a photo of sks {dog}"])
    assert args.dataset == "imagefolder:/data/dog"
    assert args.prompt_template.format(class_name="x", article="a", label=0) == "a photo of sks {dog}"
    with pytest.raises(ConfigError, match="--instance_data_dir needs --instance_prompt"):
        checked(["--instance_data_dir", "/data/dog"])


@pytest.mark.parametrize("argv,match", [
    (["--max_train_steps", "20", "--max_steps", "30"], r"--max_train_steps 20 and --max_steps 30"),
    (["--train_data_dir", "/a", "--dataset_name", "b/c"], r"--dataset_name and --train_data_dir both set --dataset"),
    (["--gradient_accumulation_steps", "2", "--physical_batch_size", "4", "--batch_size", "16"], r"both set the micro-batch"),
    (["--validation_epochs", "1", "--validation_steps", "5"], r"pass one"),
    (["--snr_gamma", "0"], r"--snr_gamma must be positive"),
    (["--noise_offset", "-1"], r"--noise_offset must be"),
])
def test_conflicting_or_bad_values_are_one_error(argv, match):
    with pytest.raises(ConfigError, match=match):
        checked(argv)


def test_a_yaml_config_takes_the_diffusers_names(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train_batch_size: 8\nmax_train_steps: 3\ntrain_data_dir: /data/x\nvalidation_prompt: a blue cup\n"
                      "mixed_precision: bf16\n")
    args = check_arguments(parse_with_config(add_finetune_arguments(argparse.ArgumentParser()), ["--config", str(config)]))
    assert (args.batch_size, args.max_steps, args.dataset) == (8, 3, "imagefolder:/data/x")
    assert args.validation_prompt == ["a blue cup"] and args.mixed_precision == "bf16" and args.physical_batch_size == 8
    assert finetune_args(train_batch_size=4, max_train_steps=2).train_batch_size == 4  # from Python too


def test_a_refused_yaml_key_is_one_line_saying_why(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train_text_encoder: true\n")
    with pytest.raises(ConfigError) as err:
        parse_with_config(add_finetune_arguments(argparse.ArgumentParser()), ["--config", str(config)])
    assert "--train_text_encoder is not supported" in str(err.value) and "DP step" in str(err.value)
    config.write_text("max_train_step: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'max_train_step'; did you mean 'max_train_steps'\?"):
        parse_with_config(add_finetune_arguments(argparse.ArgumentParser()), ["--config", str(config)])


def _recipe_error(capsys, argv):
    from dpdiff.training.cli import recipe_main

    with pytest.raises(SystemExit) as exit_:
        recipe_main("lora", "test", argv)
    err = capsys.readouterr().err.strip()
    return exit_.value.code, err


@pytest.mark.parametrize("flag,expected", [
    ("--max_trian_steps", "did you mean --max_train_steps?"),
    ("--train_batchsize", "did you mean --train_batch_size?"),
    ("--train_text_encoder", "--train_text_encoder is not supported: the text encoders run once"),
    ("--use_8bit_adam", "--use_8bit_adam is not supported"),
    ("--with_prior_preservation", "prior preservation"),
])
def test_an_unknown_or_refused_flag_is_one_line_not_a_usage_dump(capsys, flag, expected):
    code, err = _recipe_error(capsys, ["--train_data_dir", "/x", flag, "3"] if "trian" in flag or "batchsize" in flag
                              else ["--train_data_dir", "/x", flag])
    assert code == 2 and len(err.splitlines()) == 1 and "usage:" not in err and expected in err, err


def test_dpdiff_finetune_gives_the_same_one_line(capsys):
    from dpdiff.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--train_data_dir", "/x", "--max_trian_steps", "3"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err == ("dpdiff finetune: error: unknown flag --max_trian_steps; did you mean "
                                              "--max_train_steps? (diffusers' names: docs/recipes.md)")


def test_help_says_what_each_diffusers_flag_means_under_dp():
    text = re.sub(r"\s+", " ", add_finetune_arguments(FlagParser(prog="x")).format_help())
    assert "--train_batch_size" in text and "the Poisson EXPECTED logical batch" in text
    assert "--gradient_accumulation_steps" in text and "physical micro-batching" in text
    assert "diffusers flags refused" in text and "--train_text_encoder" in text
    for alias in diffusers_flags.ALIASES:
        assert f"--{alias}" in text


def test_a_small_batch_clamps_the_default_physical_batch_but_an_explicit_conflict_stays_an_error():
    assert checked(["--batch_size", "16"]).physical_batch_size == 16
    assert checked([]).physical_batch_size == 64
    with pytest.raises(ConfigError, match=r"--physical_batch_size 32 > --batch_size 16"):
        checked(["--batch_size", "16", "--physical_batch_size", "32"])


def test_fp16_on_a_cpu_is_one_clear_refusal(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--mixed_precision fp16 needs a CUDA GPU.*bf16"):
        checked(["--mixed_precision", "fp16"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # `accelerate launch --mixed_precision fp16`
    with pytest.raises(ConfigError, match=r"fp16 needs a CUDA GPU"):
        checked([])
    assert checked(["--mixed_precision", "bf16"]).mixed_precision == "bf16"  # the flag wins over Accelerate's setting
    kwargs = diffusers_run.accelerator_kwargs(checked(["--mixed_precision", "bf16", "--logging_dir", "tb"]), Path("/o"))
    assert kwargs["mixed_precision"] == "bf16" and kwargs["project_config"].logging_dir == "/o/tb"


def _plan(sigma, batch, n=90, steps=2000):
    return SimpleNamespace(noise_multiplier=sigma, batch_size=batch, sample_rate=batch / n, steps=steps, epsilon=0.05,
                           delta=1e-3, num_examples=n)


def test_sigma_is_printed_and_a_swamping_noise_warns(capsys, caplog):
    args, family = checked(["--max_grad_norm", "0.05"]), SimpleNamespace(conditioning="prompt", name="sd")
    with caplog.at_level(logging.WARNING, logger="dpdiff.training.diffusers_run"):
        diffusers_run.before_training(args, _plan(563.0, 16), family, main=True)
    out = capsys.readouterr().out
    assert "sigma = 563" in out and "sigma*C/B = 1.76" in out and "C = 0.05" in out
    assert "the noise swamps the signal" in caplog.text and "35.2 x C" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpdiff.training.diffusers_run"):
        diffusers_run.before_training(args, _plan(0.9, 256, n=60000, steps=234), family, main=True)
    assert "sigma = 0.9" in capsys.readouterr().out and "swamps" not in caplog.text


def test_validation_epochs_become_steps_and_label_families_refuse_prompts():
    args = checked(["--validation_epochs", "2", "--batch_size", "10"])
    diffusers_run.before_training(args, _plan(1.0, 10, n=100), SimpleNamespace(conditioning="prompt", name="sd"), main=False)
    assert args.validation_steps == 20  # an expected epoch is n / B = 10 steps
    assert replayable_flags(args).get("validation_epochs") is None  # the replayed config is not a conflict
    check_arguments(args)
    with pytest.raises(ConfigError, match="conditioned on class labels"):
        diffusers_run.before_training(checked(["--validation_prompt", "x"]), _plan(1.0, 10),
                                      SimpleNamespace(conditioning="label", name="dit"), main=False)


def test_lr_scheduler_follows_diffusers_schedule_statelessly():
    from diffusers.optimization import get_scheduler

    args = checked(["--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--learning_rate", "0.01"])
    param = torch.nn.Parameter(torch.zeros(2))
    ours, reference = torch.optim.AdamW([param], lr=0.01), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    set_lr, sched = diffusers_run.lr_schedule(args, ours, 10), get_scheduler("cosine", reference, num_warmup_steps=3, num_training_steps=10)
    for step in range(10):
        set_lr(step)
        assert ours.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"])
        reference.step()
        sched.step()
    set_lr(4)  # a resumed run at step 4 gets the same rate as an uninterrupted one
    assert ours.param_groups[0]["lr"] == pytest.approx(0.01 * sched.lr_lambdas[0](4))


def test_min_snr_is_a_timestep_sampling_weight():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    weights = diffusers_run.min_snr_weights(scheduler, 5.0, "epsilon")
    snr = compute_snr(scheduler, torch.arange(1000)).double()
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr  # diffusers' loss weight, as probabilities
    assert torch.allclose(weights, expected / expected.sum(), rtol=1e-5)
    assert weights[0] < weights[-1] and weights.sum().item() == pytest.approx(1.0)
    args = checked(["--snr_gamma", "5"])
    objective = SimpleNamespace(kind="flow_matching")
    with pytest.raises(ConfigError, match="weighting_scheme"):
        diffusers_run.training_draws(args, scheduler, objective, None)


def test_noise_offset_adds_a_per_channel_draw_keyed_by_the_example():
    from dpdiff.families.objectives import DenoisingObjective
    from diffusers import DDPMScheduler
    from dpdiff.privacy.diffusion_loss import example_generator

    inner = DenoisingObjective(DDPMScheduler(num_train_timesteps=1000))
    objective, weights = diffusers_run.training_draws(checked(["--noise_offset", "0.1"]), inner.noise_scheduler, inner, None)
    latents = torch.zeros(2, 4, 8, 8)
    noise, t = objective.draw(latents, 3, [example_generator(0, 5, i) for i in (7, 9)])
    plain, t0 = inner.draw(latents, 3, [example_generator(0, 5, i) for i in (7, 9)])
    offset = noise - plain
    assert torch.equal(t, t0) and weights is None and objective.describe()["noise_offset"] == 0.1
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset)) and offset.abs().sum() > 0  # constant per (row, channel)
    again, _ = objective.draw(latents, 3, [example_generator(0, 5, i) for i in (7, 9)])
    assert torch.equal(noise, again)


def test_cache_dir_is_a_cache_root_for_hub_downloads_and_the_latent_cache(tmp_path):
    args = checked(["--cache_dir", str(tmp_path / "hf"), "--revision", "abc", "--variant", "fp16"])
    assert diffusers_run.latent_cache_dir(args, tmp_path / "out") == tmp_path / "hf" / "dpdiff_latent_cache"
    assert diffusers_run.pipeline_kwargs(args) == {"revision": "abc", "variant": "fp16", "cache_dir": str(tmp_path / "hf")}
    assert diffusers_run.latent_cache_dir(checked([]), tmp_path / "out") == tmp_path / "out" / "latent_cache"
    built = tmp_path / "old"  # a latent cache built when --cache_dir named the cache itself is used as it is
    built.mkdir()
    (built / "manifest.json").write_text("{}")
    assert diffusers_run.latent_cache_dir(checked(["--cache_dir", str(built)]), tmp_path / "out") == built


def test_docs_table_maps_every_diffusers_name():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    table = doc[doc.index("| diffusers flag |"):]
    group = [a.option_strings[0] for a in add_finetune_arguments(argparse.ArgumentParser())._actions
             if a.container.title and a.container.title.startswith("diffusers' flag names")]
    for flag in [*group, *(f"--{n}" for n in diffusers_flags.REFUSED), "--cache_dir", "--max_grad_norm"]:
        assert f"`{flag}`" in table or f"`{flag}," in table or f", `{flag}`" in table, flag


def test_recipes_and_modules_stay_small():
    for path in [*ROOT.glob("recipes/finetune_*.py")]:
        assert len(path.read_text().splitlines()) <= 150, path
    for path in ("dpdiff/training/diffusers_flags.py", "dpdiff/training/diffusers_run.py", "dpdiff/training/loop.py",
                 "dpdiff/config.py", "dpdiff/model_card.py"):
        assert len((ROOT / path).read_text().splitlines()) <= 400, path
