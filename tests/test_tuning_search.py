"""A real (tiny) `dpdiff tune` end to end: two trials on a few hundred Fashion-MNIST images, killed inside the
second trial and resumed; the count is not redrawn, the score is not released twice, the first trial is not rerun,
and the output states the whole search with an epsilon that dp-accounting reproduces from privacy.json alone."""

from __future__ import annotations

import json
import stat
import time

import pytest
import yaml

from dpdiff.cli import main
from dpdiff.tuning import score as scoring
from dpdiff.tuning import search as search_mod
from test_tuning_accounting import independent_total

SEARCH = {
    "fixed": {"pretrained_model_name_or_path": "dpdiff-tiny", "dataset": "fashion_mnist", "max_train_samples": 200,
              "batch_size": 16, "physical_batch_size": 16, "num_inference_steps": 2, "checkpointing_steps": 2,
              "ema_decay": 0.0},
    "search": {"learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}, "max_steps": [2, 3]},
    "trials": {"distribution": "geometric", "mean": 2},
    "score": {"validation_fraction": 0.2, "num_samples": 4, "input_size": 32, "num_inference_steps": 2},
}


class Killed(RuntimeError):
    pass


def test_tiny_search_runs_resumes_and_states_the_whole_search(tmp_path, monkeypatch, capsys):
    import dpdiff.training.loop as loop
    import dpdiff.tuning.trials as trials

    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(SEARCH))
    out = tmp_path / "tuned"
    draws, releases, runs = [], [], []
    monkeypatch.setattr(trials, "draw_count", lambda name, mean: draws.append((name, mean)) or 2)  # two trials, for the test
    import torch
    import dpdiff.tuning.space as space_mod

    uniforms = iter([[0.2, 0.1], [0.8, 0.9]])  # (learning_rate, max_steps): trial 0 takes 2 steps, trial 1 three
    monkeypatch.setattr(space_mod, "secure_uniform", lambda n: torch.tensor(next(uniforms), dtype=torch.float64))
    release = scoring.release_validation
    monkeypatch.setattr(scoring, "release_validation", lambda *a, **k: releases.append(1) or release(*a, **k))
    finetune = loop.finetune
    finished = []

    def recording_finetune(args):
        runs.append((args.output_dir, args.resume_from_checkpoint))
        result = finetune(args)
        finished.append(time.time())
        return result

    monkeypatch.setattr(loop, "finetune", recording_finetune)
    import dpdiff.training.latent_cache as cache_module

    encode, encodes = cache_module.encode_fixed_batch, []
    monkeypatch.setattr(cache_module, "encode_fixed_batch", lambda *a, **k: encodes.append(1) or encode(*a, **k))
    checkpoint = loop._checkpoint

    def killing_checkpoint(args, *rest):
        checkpoint(args, *rest)
        if args.output_dir.endswith("trial-1"):
            raise Killed("killed inside the second trial, after its checkpoint")

    monkeypatch.setattr(loop, "_checkpoint", killing_checkpoint)
    argv = ["tune", "--config", str(config), "--target_epsilon", "8", "--delta", "1e-3", "--output_dir", str(out)]
    with pytest.raises(Killed):
        main(argv)
    state_dir = out / ".tune"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700  # the secret count lives here
    state = json.loads((state_dir / "state.json").read_text())
    assert state["count"] == 2 and len(state["done"]) == 1 and len(state["ledger"]) == 1
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err  # a fresh start would spend the budget again

    monkeypatch.setattr(loop, "_checkpoint", checkpoint)
    assert main(argv + ["--resume"]) == 0
    assert draws == [("geometric", 2.0)] and releases == [1]  # one draw, one release, across the kill
    assert [(r.rsplit("/", 1)[1], resume) for r, resume in runs] == [("trial-0", None), ("trial-1", None), ("trial-1", "latest")]
    assert len(encodes) == 1  # one latent cache (one VAE batch: 160 images at 32 px), shared by every trial and the resume

    assert not state_dir.exists()  # no losing trial, count, score or release survives
    privacy = json.loads((out / "privacy.json").read_text())
    s = privacy["search"]
    assert privacy["epsilon"] <= 8 and privacy["target_epsilon"] == 8 and privacy["delta"] == 1e-3
    assert independent_total(s["events"], 1e-3) == pytest.approx(privacy["epsilon"], rel=1e-9)
    assert s["trial_count"].startswith("secret") and "2" not in json.dumps(s["trial_count"])
    assert "ledger" not in privacy  # a trial's own ledger would state a trial's epsilon
    # the released adapter is the selected trial's, trained with its profile's calibrated sigma on the training split
    selected = s["selected"]
    profile = next(p for p in s["profiles"] if p["steps"] == selected["max_steps"])
    assert privacy["noise_multiplier"] == profile["noise_multiplier"] and privacy["steps"] == selected["max_steps"]
    assert privacy["sample_rate"] == pytest.approx(16 / privacy["num_examples"]) and privacy["num_examples"] < 200
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "checkpoints").exists()
    # nothing tells which trial won or when: no trial folder name, no file older than the last trial's end
    for path in out.rglob("*"):
        if path.is_file():
            assert path.stat().st_mtime >= finished[-1] - 1e-3, path
            if path.suffix in (".json", ".yaml", ".md"):
                assert ".tune" not in path.read_text() and "trial-" not in path.read_text(), path
    replay = yaml.safe_load((out / "training_config.yaml").read_text())
    assert replay["output_dir"] == str(out) and replay["learning_rate"] == selected["learning_rate"]
    assert replay["target_epsilon"] < privacy["epsilon"]  # the selected trial's own epsilon, not the search's
    card = (out / "README.md").read_text()
    assert "Covered: the hyperparameter search" in card and "Not covered: hyperparameter tuning" not in card


def test_split_is_per_example_and_disjoint():
    """Adding an example moves no other example between the parts; the parts do not overlap."""
    import numpy as np

    from dpdiff.data.image_source import ImageSource, build_dataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(60, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, size=60)
    names = ["a", "b", "c"]
    small = ImageSource("x", "train", build_dataset(images[:59], labels[:59], names), names)
    big = ImageSource("x", "train", build_dataset(images, labels, names), names)
    train_s, val_s = scoring.split_source(small, 0.3, salt=7)
    train_b, val_b = scoring.split_source(big, 0.3, salt=7)
    key = lambda row: (np.asarray(row["image"]).tobytes(), row["label"])  # noqa: E731
    ts, vs = {key(r) for r in train_s.dataset}, {key(r) for r in val_s}
    tb, vb = {key(r) for r in train_b.dataset}, {key(r) for r in val_b}
    assert not ts & vs and len(ts) + len(vs) == 59
    assert ts <= tb and vs <= vb and len(tb - ts) + len(vb - vs) == 1


def test_zero_trials_release_nothing_and_a_changed_budget_is_refused_on_resume(tmp_path, monkeypatch, capsys):
    """Poisson may draw K = 0: nothing comes out (no release either). A search resumed with another epsilon would
    not be the search that was accounted: refused, the state kept."""
    import dpdiff.tuning.trials as trials

    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({**SEARCH, "trials": {"distribution": "poisson", "mean": 2}}))
    out = tmp_path / "tuned"
    argv = ["tune", "--config", str(config), "--target_epsilon", "8", "--delta", "1e-3", "--output_dir", str(out)]
    monkeypatch.setattr(trials, "draw_count", lambda name, mean: 0)
    monkeypatch.setattr(scoring, "release_validation", lambda *a, **k: pytest.fail("released with no trial to score"))
    assert main(argv) == 0 and "zero" in capsys.readouterr().out
    assert not (out / "privacy.json").exists() and not (out / ".tune").exists()

    monkeypatch.setattr(trials, "draw_count", lambda name, mean: 1)
    monkeypatch.setattr(search_mod, "_run_trial", lambda *a, **k: (_ for _ in ()).throw(Killed("killed before training")))
    with pytest.raises(Killed):
        main(argv[:-1] + [str(tmp_path / "second")])
    resumed = argv[:-1] + [str(tmp_path / "second"), "--resume"]
    resumed[resumed.index("8")] = "9"
    assert main(resumed) == 2 and "calibration differs" in capsys.readouterr().err
    assert (tmp_path / "second" / ".tune" / "state.json").is_file()


def test_a_multi_process_launch_is_refused_before_any_draw(tmp_path, monkeypatch, capsys):
    """Under `accelerate launch --num_processes 2` each process would draw its own secret count: refused, nothing drawn."""
    import dpdiff.tuning.trials as trials

    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(SEARCH))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trials, "draw_count", lambda *a: pytest.fail("drew a count in a multi-process launch"))
    argv = ["tune", "--config", str(config), "--target_epsilon", "8", "--delta", "1e-3", "--output_dir", str(tmp_path / "t")]
    assert main(argv) == 2 and "ONE process" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
