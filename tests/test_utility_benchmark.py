"""Smoke test of benchmarks/utility.py: one DP method with a few steps on 64 private images plus the three
references (real, its VAE reconstruction, non-private LoRA), end to end (train -> sample -> evaluate ->
JSON, plots, markdown), all outside docs/."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("utility_benchmark", ROOT / "benchmarks" / "utility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke_argv(base, tmp_path, *extra):
    return [
        "--methods", "lora", "--epsilons", "10", "--references", "real", "vae_reconstruction", "nonprivate_lora",
        "--base_model", str(base), "--max_train_samples", "64", "--max_steps", "2", "--batch_size", "16",
        "--physical_batch_size", "16", "--num_per_class", "3", "--inference_steps", "2", "--eval_epochs", "1",
        "--test_limit", "100", "--num_fd_samples", "8", "--fd_input_size", "32", "--smoke",
        "--output_dir", str(tmp_path / "out"), "--docs_dir", str(tmp_path / "docs"),
        "--benchmarks_md", str(tmp_path / "docs" / "benchmarks.md"), *extra,
    ]


def test_smoke_run_writes_results_plots_and_section(tiny_pipeline_dir, tmp_path, capsys):
    bench = load_benchmark()
    repo_md = (ROOT / "docs" / "benchmarks.md").read_text()
    results = bench.main(smoke_argv(tiny_pipeline_dir, tmp_path))

    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["run_kind"] == "smoke" and set(on_disk["runs"]) == {"lora_eps10", "real", "vae_reconstruction", "nonprivate_lora"}
    assert on_disk["runs"] == json.loads(json.dumps(results["runs"]))
    for key, run in on_disk["runs"].items():
        assert run["run_kind"] == "smoke", key
        assert set(run["accuracy"]) == {"cnn", "logreg", "mlp"} and all(0 <= a <= 1 for a in run["accuracy"].values())
        assert run["fd"]["num_real"] == run["fd"]["num_synthetic"] == 8 and run["fd"]["value"] >= 0
        assert "evaluate" in run["timings"] and run["timings"]["evaluate"]["cpu_s"] >= 0
    dp, nonprivate = on_disk["runs"]["lora_eps10"], on_disk["runs"]["nonprivate_lora"]
    assert dp["num_classifier_train_images"] == 30 and set(dp["timings"]) == {"train", "sample", "evaluate"}
    assert 0 < dp["guarantee"]["epsilon"] <= 10 and dp["guarantee"]["steps"] == 2 and dp["guarantee"]["num_examples"] == 64
    # the non-private reference states no guarantee and leaves nothing a DP tool would sample or publish
    assert nonprivate["private"] is False and nonprivate["guarantee"] is None
    assert not (tmp_path / "out" / "runs" / "nonprivate_lora" / "privacy.json").exists()
    # the real reference trains on as many private images per class as each synthetic set has (3), its VAE copy on the same
    real, recon = on_disk["runs"]["real"], on_disk["runs"]["vae_reconstruction"]
    assert max(real["train_count_per_class"].values()) == 3 and 25 <= real["num_classifier_train_images"] <= 30
    assert recon["train_count_per_class"] == real["train_count_per_class"]

    docs = tmp_path / "docs"
    for name in ("utility_accuracy.png", "utility_fd.png", "utility_samples_lora.png", "utility_samples_nonprivate_lora.png"):
        assert (docs / name).stat().st_size > 1000, name
    section = (docs / "benchmarks.md").read_text()
    assert section.startswith("# Benchmarks") and "## Utility" in section and "SMOKE RUN" in section
    assert "](utility_accuracy.png)" in section and "DPDM" in section and "86.2" in section
    assert f"| vae_reconstruction ({recon['num_classifier_train_images']} images) | – | none (not private) |" in section
    assert (ROOT / "docs" / "benchmarks.md").read_text() == repo_md  # the repo's docs are untouched

    # resuming keeps finished runs with the same settings instead of training again
    capsys.readouterr()
    bench.main(smoke_argv(tiny_pipeline_dir, tmp_path, "--skip_existing", "--references", "real"))
    assert "real: kept" in capsys.readouterr().out
    # a finished training whose sampling was interrupted is sampled again, not retrained
    adapter = tmp_path / "out" / "runs" / "lora_eps10" / "pytorch_lora_weights.safetensors"
    trained_at = adapter.stat().st_mtime_ns
    results_file = tmp_path / "out" / "results.json"
    partial = json.loads(results_file.read_text())
    del partial["runs"]["lora_eps10"]
    results_file.write_text(json.dumps(partial))
    again = bench.main(smoke_argv(tiny_pipeline_dir, tmp_path, "--skip_existing", "--references"))
    assert adapter.stat().st_mtime_ns == trained_at
    assert again["runs"]["lora_eps10"]["guarantee"] == dp["guarantee"] and again["runs"]["lora_eps10"]["num_classifier_train_images"] == 30
    # the FD reference statistics were computed once and kept: the re-sampled run scores the same FD
    assert len(list((tmp_path / "out").glob("fd-real-*.npz"))) == 1
    assert again["runs"]["lora_eps10"]["fd"]["value"] == pytest.approx(dp["fd"]["value"], rel=1e-6)

    # the section is rebuilt from what the docs folder holds (utility_results.json), the synthetic sets gone as in a
    # clean clone: the same table, and the sample grid it made before is kept rather than failing on a missing folder
    docs_md, grid = (docs / "benchmarks.md").read_text(), (docs / "utility_samples_lora.png").read_bytes()
    shown = json.loads((docs / "utility_results.json").read_text())
    assert shown["runs"] == json.loads(json.dumps(again["runs"])) and shown["commands"] == again["commands"]
    shutil.rmtree(again["runs"]["lora_eps10"]["synthetic_dir"])
    bench.main(["--report_from", str(docs / "utility_results.json"), "--docs_dir", str(docs), "--benchmarks_md", str(docs / "benchmarks.md")])
    assert (docs / "benchmarks.md").read_text() == docs_md and (docs / "utility_samples_lora.png").read_bytes() == grid

    # a finished run (here the benchmark's own; the demo's or a tune output alike) scored by --score_runs with the same
    # sampling settings gets the same images and so the same scores, and keeps its own guarantee
    run_dir = tmp_path / "out" / "runs" / "lora_eps10"
    scored = bench.main(["--score_runs", str(run_dir), "--score_section", "Scored runs",
                         *smoke_argv(tiny_pipeline_dir, tmp_path)[4:]])[str(run_dir)]
    section = (docs / "benchmarks.md").read_text().split("## Scored runs")[1]
    assert f"| lora_eps10 | finetune | {dp['guarantee']['epsilon']:.3f} (" in section and "| 8 |" in section
    assert scored["accuracy"] == again["runs"]["lora_eps10"]["accuracy"] and scored["guarantee"]["epsilon"] == dp["guarantee"]["epsilon"]
    assert json.loads((tmp_path / "out" / "scored_runs.json").read_text())[str(run_dir)]["fd"] == scored["fd"]
    with pytest.raises(bench.ConfigError, match="no privacy.json"):
        bench.main(["--score_runs", str(tmp_path), "--output_dir", str(tmp_path / "out")])


def test_bad_options_refused_before_work(tmp_path):
    bench = load_benchmark()
    from dpdiff.errors import ConfigError, PrivacyError

    with pytest.raises(ConfigError, match="unknown"):
        bench.main(["--methods", "dpgan", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="nothing to run"):
        bench.main(["--methods", "--references", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="num_fd_samples"):
        bench.main(["--num_per_class", "3", "--num_fd_samples", "100", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="checkpointing_steps"):
        bench.main(["--checkpointing_steps", "-1", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="timestep_bias_portion must be in"):
        bench.main(["--timestep_bias_strategy", "later", "--timestep_bias_portion", "2", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="noise_multiplicity"):
        bench.main(["--noise_multiplicity", "0", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="attention_start_index"):
        bench.main(["--attention_start_index", "-1", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="mepf_base_channels"):
        bench.main(["--mepf_base_channels", "0", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="stage9"):
        bench.main(["--mepf_feature_layers", "stage1", "stage9", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(PrivacyError, match="1/n"):
        bench.main(["--max_train_samples", "1000", "--delta", "1e-3", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_mepf_feature_layers_from_before_the_flag_do_not_match_the_new_default():
    bench = load_benchmark()
    parser = bench.build_parser()
    new_default = bench.settings(parser.parse_args([]))
    assert new_default["mepf_feature_layers"] == ["stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7"]
    # results written before the flag existed trained on stage2..stage7: a run asking for those still matches them
    old = bench.settings(parser.parse_args(["--mepf_feature_layers", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7"]))
    assert "mepf_feature_layers" not in old


def test_mepf_pixel_features_are_the_default_and_rows_from_before_match_only_without_them():
    bench = load_benchmark()
    parser = bench.build_parser()
    assert bench.settings(parser.parse_args([]))["mepf_pixel_features"] is True
    # results written before the pixel block existed ran without it: only --no-mepf_pixel_features still matches them
    assert "mepf_pixel_features" not in bench.settings(parser.parse_args(["--no-mepf_pixel_features"]))
    # the default DP-MEPF recipe is the measured one (mepf_eps10_10-12), recorded: old rows ran width 32, constant lr
    recipe = bench.settings(parser.parse_args([]))
    assert (recipe["mepf_base_channels"], recipe["mepf_lr_schedule"], recipe["mepf_generator_steps"]) == (64, "step", 7000)
    # recipes/configs/mepf.yaml says it is this recipe: it must stay so
    from dpdiff.config import load_config

    shipped = load_config(Path(__file__).resolve().parent.parent / "recipes" / "configs" / "mepf.yaml")
    defaults = vars(parser.parse_args([]))
    for flag in ("generator_steps", "base_channels", "lr_schedule", "batch_size", "feature_input_size", "pixel_features"):
        assert shipped[flag] == defaults[f"mepf_{flag}"], flag
    assert shipped["feature_layers"] is None and defaults["mepf_feature_layers"] == list(bench.EFFICIENTNET_LITE0_DEFAULT_LAYERS)


def test_merged_report_names_settings_the_runs_do_not_share():
    load_benchmark()  # puts benchmarks/ on sys.path
    from _utility_report import markdown

    def run(method, eps, **settings):
        base = {"delta": 1e-5, "base_model": "dpdiff-tiny", "epochs": 2.5, "batch_size": 512, "max_grad_norm": 0.05,
                "num_per_class": 300, "inference_steps": 25, "guidance_scale": 2.0, "mepf_generator_steps": 2000,
                "rank": 8, "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
        return {"method": method, "target_epsilon": eps, "settings": {**base, **settings},
                "guarantee": {"epsilon": eps, "noise_multiplier": 0.625, "steps": 200}, "accuracy": {"cnn": 0.5, "logreg": 0.4, "mlp": 0.3},
                "fd": {"value": 100.0, "description": "FD (EfficientNet-Lite0)"}, "timings": {}}

    real = {**run("real", None), "guarantee": None, "num_classifier_train_images": 60000}
    runs = {"full_eps10": run("full", 10, max_grad_norm=1.0, learning_rate=5e-4),
            "lora_eps10": run("lora", 10, epochs=6.8, batch_size=2048),
            "nonprivate_lora": {**run("nonprivate_lora", None, batch_size=1024), "guarantee": None}, "real": real}
    text = markdown({"runs": runs, "run_kind": "reduced", "commands": []}, {})
    paragraph = text.split("\n")[2]
    assert "DP-SGD for (see each row) at batch (see each row), clipping norm (see each row), learning rate (see each row)" in paragraph
    assert "2.5 epochs" not in paragraph and "300 synthetic images per class" in paragraph
    assert "full_eps10 (batch_size=512, epochs=2.5, learning_rate=0.0005, max_grad_norm=1.0)" in text
    # the lora run gave no learning rate: its row names the default it ran with
    assert "lora_eps10 (batch_size=2048, epochs=6.8, learning_rate=0.002, max_grad_norm=0.05)" in text
    assert "max_grad_norm=0.05) | 10 | 10 | 0.625 | 200 | 50.0 | 40.0 | 30.0 | 100.00 |" in text  # sigma and steps beside epsilon
    # the non-private reference trains the same way: its row names its batch too; the real-data row trains nothing
    assert "| nonprivate_lora (batch_size=1024, epochs=2.5, learning_rate=0.002) | – | none (not private) |" in text
    assert "| real (60,000 images) | – | none (not private) |" in text  # the size its ceiling holds for
    # runs on another base pipeline (e.g. a wider preset) say so, and so does that pipeline's VAE ceiling
    wide = markdown({"runs": {"lora_eps10": run("lora", 10), "lora_eps10_wide": run("lora", 10, base_model="outputs/wide"),
                              "vae_reconstruction": {**run("vae_reconstruction", None, base_model="outputs/wide"), "guarantee": None,
                                                     "num_classifier_train_images": 3000}},
                     "run_kind": "reduced", "commands": []}, {})
    assert "base pipeline (see each row)" in wide.split("\n")[2]
    assert "| lora_eps10_wide (base_model=outputs/wide) |" in wide and "| lora_eps10 (base_model=dpdiff-tiny) |" in wide
    assert "| vae_reconstruction (base_model=outputs/wide) (3,000 images) |" in wide
    assert "base pipeline `dpdiff-tiny`" in text  # every run of `text` shares it
    # a short run (max_steps) beside runs of the epochs schedule: the paragraph names the epochs, the row its steps
    short = markdown({"runs": {"lora_eps10": run("lora", 10, max_steps=None),
                               "nonprivate_lora": {**run("nonprivate_lora", None, max_steps=200), "guarantee": None}},
                      "run_kind": "reduced", "commands": []}, {})
    assert "DP-SGD for 2.5 epochs (or the max_steps a row names) at batch 512" in short
    assert "| nonprivate_lora (max_steps=200) |" in short and "| lora_eps10 |" in short
    # --eval_repeats: the cells are means over the classifier seeds with their spread, and the paragraph says so
    spread = {**run("lora", 10, eval_repeats=3), "accuracy_std": {"cnn": 0.0104, "logreg": 0.002, "mlp": 0.005}}
    repeated = markdown({"runs": {"lora_eps10": spread}, "run_kind": "reduced", "commands": []}, {})
    assert "| 50.0 ± 1.0 | 40.0 ± 0.2 | 30.0 ± 0.5 |" in repeated and "mean over 3 classifier seeds ± their std" in repeated
    mixed = markdown({"runs": {"lora_eps10": spread, "lora_eps1": run("lora", 1)}, "run_kind": "reduced", "commands": []}, {})
    assert "an accuracy with ± is the mean over several classifier seeds" in mixed and "| 50.0 | 40.0 | 30.0 |" in mixed
    # runs that share every setting state them once
    same = markdown({"runs": {"lora_eps10": run("lora", 10)}, "run_kind": "reduced", "commands": []}, {})
    assert "DP-SGD for 2.5 epochs at batch 512, clipping norm 0.05, learning rate each method's default (lora 0.002" in same
    named = markdown({"runs": {"lora_eps10": run("lora", 10, learning_rate=5e-4)}, "run_kind": "reduced", "commands": []}, {})
    assert "clipping norm 0.05, learning rate 0.0005 (AdamW); LoRA rank 8 on to_q to_k to_v to_out.0;" in named
    # the LoRA targets are always said: once when shared, on the LoRA rows when not (never on the other methods' rows)
    wider = markdown({"runs": {"lora_eps10": run("lora", 10), "lora_eps10_2": run("lora", 10, lora_target_modules=["to_q", "conv1"]),
                               "full_eps10": run("full", 10)}, "run_kind": "reduced", "commands": []}, {})
    assert "LoRA rank 8 on (see each row);" in wider and "| lora_eps10_2 (lora_target_modules=to_q conv1) |" in wider
    assert "| full_eps10 |" in wider
    assert "LoRA rank" not in markdown({"runs": {"full_eps10": run("full", 10)}, "run_kind": "reduced", "commands": []}, {})


def test_merging_runs_of_the_same_name_on_two_base_pipelines_keeps_both_as_separate_series():
    bench = load_benchmark()
    from _utility_report import series

    from dpdiff.errors import ConfigError

    def run(method, eps, base):
        return {"method": method, "target_epsilon": eps, "settings": {"base_model": base, "batch_size": 512}}

    shipped = {"lora_eps10": run("lora", 10, "dpdiff-tiny"), "lora_eps1": run("lora", 1, "dpdiff-tiny"),
               "real": run("real", None, "dpdiff-tiny")}
    wide = {"lora_eps10": run("lora", 10, "outputs/preset-big"), "nonprivate_lora": run("nonprivate_lora", None, "outputs/preset-big")}
    merged = bench.merge_runs([shipped, wide])
    assert list(merged) == ["lora_eps1", "lora_eps10", "lora_eps10_2", "real", "nonprivate_lora"]
    assert merged["lora_eps10_2"]["settings"]["base_model"] == "outputs/preset-big" and merged["lora_eps10_2"]["name"] == "lora_eps10"
    # one line / sample grid per method and base pipeline: the wider preset's point is not joined to the shipped line
    lines = series(merged)
    assert {k: sorted(r["target_epsilon"] or 0 for r in v) for k, v in lines.items()} == {
        "lora_dpdiff-tiny": [1, 10], "lora_preset-big": [10], "nonprivate_lora_preset-big": [0]}
    assert set(series(shipped)) == {"lora"}  # one base pipeline: the names stay as they were
    # a timestep-biased run is its own series beside the uniform ones (older results files lack the setting: none)
    biased = {**shipped, "lora_eps10_2": {**run("lora", 10, "dpdiff-tiny"),
                                          "settings": {"base_model": "dpdiff-tiny", "timestep_bias_strategy": "later"}}}
    assert {k: len(v) for k, v in series(biased).items()} == {"lora": 2, "lora_bias-later": 1}
    # two presets in folders of the same name are still two series
    twins = {"lora_eps10": run("lora", 10, "a/preset"), "lora_eps1": run("lora", 1, "b/preset")}
    assert set(series(twins)) == {"lora_a_preset", "lora_b_preset"}
    # a merged file merges again to the same keys (docs/utility_results.json plus new runs)
    assert list(bench.merge_runs([merged])) == list(merged) and bench.merge_runs([merged])["lora_eps10_2"] == merged["lora_eps10_2"]
    # the same run in two files would be counted twice
    with pytest.raises(ConfigError, match="same settings"):
        bench.merge_runs([shipped, {"lora_eps1": run("lora", 1, "dpdiff-tiny")}])


def test_interrupted_training_resumes_from_its_checkpoint_with_the_budget_spent(tiny_pipeline_dir, tmp_path):
    """A schedule longer than one sitting: --checkpointing_steps + --skip_existing continue the DP-SGD run
    from its latest checkpoint, ledger included, instead of starting over (or resetting the budget)."""
    bench = load_benchmark()
    argv = smoke_argv(tiny_pipeline_dir, tmp_path, "--references", "--max_steps", "4", "--checkpointing_steps", "2")
    whole = bench.main(argv)["runs"]["lora_eps10"]
    run = tmp_path / "out" / "runs" / "lora_eps10"
    checkpoint = run / "checkpoints" / "checkpoint-2"
    written = checkpoint.stat().st_mtime_ns

    def interrupt():  # what a process killed after its step-2 checkpoint leaves: no release, no results
        for name in ("benchmark_trained.json", "privacy.json", "pytorch_lora_weights.safetensors"):
            (run / name).unlink()
        (tmp_path / "out" / "results.json").unlink()

    interrupt()
    resumed = bench.main([*argv, "--skip_existing"])["runs"]["lora_eps10"]
    assert resumed["timings"]["train"]["resumed_at_step"] == 2
    assert checkpoint.stat().st_mtime_ns == written  # continued from it, not retrained from step 0
    assert resumed["guarantee"]["steps"] == 4 and resumed["guarantee"]["epsilon"] == pytest.approx(whole["guarantee"]["epsilon"])
    assert sum(n for _, _, n in json.loads((run / "privacy.json").read_text())["ledger"]["history"]) == 4
    assert "steps 2+ only" in (tmp_path / "docs" / "benchmarks.md").read_text()

    # a checkpoint of other settings is never continued: the run starts over, here with K = 2 draws per example
    interrupt()
    other = bench.main([*argv, "--skip_existing", "--noise_multiplicity", "2", "--timestep_bias_strategy", "later",
                        "--timestep_bias_multiplier", "4", "--eval_repeats", "2"])["runs"]["lora_eps10"]
    assert "resumed_at_step" not in other["timings"]["train"] and checkpoint.stat().st_mtime_ns != written
    assert json.loads((run / "privacy.json").read_text())["noise_multiplicity"] == 2 == other["settings"]["noise_multiplicity"]
    assert other["settings"]["timestep_bias_strategy"] == "later" and other["settings"]["timestep_bias_multiplier"] == 4
    assert set(other["accuracy_std"]) == {"cnn", "logreg", "mlp"} and "accuracy_std" not in whole  # --eval_repeats 2
    # flags at their defaults are left out: results files from before the flags existed still match
    assert not {"noise_multiplicity", "timestep_bias_strategy", "eval_repeats", "attention_start_index",
                "mepf_feature_input_size"} & set(whole["settings"])


def test_vae_reconstruction_reference_is_each_private_image_through_the_preset_vae():
    bench = load_benchmark()
    args = bench.build_parser().parse_args(["--max_train_samples", "32", "--device", "cpu"])
    images, labels = bench.vae_reconstructions(args)
    from dpdiff.data import load_source

    train = load_source(bench.DATASET, "train", limit=32, seed=args.seed)
    originals = bench.images_to_tensor(train.dataset["image"], bench.RESOLUTION, bench.CHANNELS)
    assert images.shape == originals.shape == (32, 1, 28, 28) and labels.tolist() == list(train.dataset["label"])
    own = ((images - originals) ** 2).mean(dim=(1, 2, 3))
    others = ((images - originals.roll(1, dims=0)) ** 2).mean(dim=(1, 2, 3))
    # a lossy copy of its own image (the preset's stated Fashion-MNIST error is ~0.02), far from the next image
    assert 0 < own.mean() < 0.1 and (own < others).all()


def test_interrupted_mepf_reuses_its_release_and_continues_its_generator(tiny_pipeline_dir, tmp_path):
    """DP-MEPF under --skip_existing: once the embedding is released, an interrupted run never releases again
    (that would spend the budget twice on the same data while the row shows one release); the generator
    continues from its checkpoint, or from step 0 when the process died before the first one."""
    from dpdiff.io import sha256_file
    from dpdiff.mepf.release import load_release

    bench = load_benchmark()
    argv = smoke_argv(tiny_pipeline_dir, tmp_path, "--methods", "mepf", "--references", "--mepf_generator_steps", "4",
                      "--mepf_base_channels", "8", "--skip_existing")
    whole = bench.main(argv)["runs"]["mepf_eps10"]
    run = tmp_path / "out" / "runs" / "mepf_eps10"
    release = sha256_file(run / "release.safetensors")
    state = run / "checkpoint" / "trainer_state.json"
    assert json.loads(state.read_text())["step"] == 4 and "resumed_at_step" not in whole["timings"]["train"]
    assert load_release(run).config.pixels  # --mepf_pixel_features (the default) reaches dpdiff mepf

    def interrupt(checkpoint: bool):  # a process killed after the release (and maybe after a checkpoint)
        for name in ("benchmark_trained.json", "generation_config.json", "mepf_config.json"):
            (run / name).unlink()
        (tmp_path / "out" / "results.json").unlink()
        if not checkpoint:
            shutil.rmtree(run / "checkpoint")
            shutil.rmtree(run / "generator")

    interrupt(checkpoint=True)
    resumed = bench.main(argv)["runs"]["mepf_eps10"]
    assert resumed["timings"]["train"]["resumed_at_step"] == 4
    assert sha256_file(run / "release.safetensors") == release and resumed["guarantee"] == whole["guarantee"]

    interrupt(checkpoint=False)
    restarted = bench.main(argv)["runs"]["mepf_eps10"]
    assert restarted["timings"]["train"]["resumed_at_step"] == 0 and json.loads(state.read_text())["step"] == 4
    assert sha256_file(run / "release.safetensors") == release and restarted["guarantee"] == whole["guarantee"]

    # other settings never continue this release: a new run releases anew
    interrupt(checkpoint=True)
    other = bench.main([*argv, "--mepf_generator_steps", "2"])["runs"]["mepf_eps10"]
    assert "resumed_at_step" not in other["timings"]["train"] and sha256_file(run / "release.safetensors") != release


def test_wall_minutes_do_not_depend_on_the_order_the_timings_are_stored_in():
    """The live run keeps timings in phase order (train, sample, evaluate); results.json is written with sorted keys
    (evaluate, sample, train), so a section rebuilt by --report_from sums them in another order. These three seconds
    give 0.105 and 0.10500000000000001 minutes when summed left to right in the two orders: 0.10 vs 0.11."""
    load_benchmark()  # puts benchmarks/ on sys.path
    from _utility_report import markdown

    def row(timings):
        run = {"method": "lora", "target_epsilon": 10, "settings": {"num_per_class": 300}, "accuracy": {"cnn": 0.5, "logreg": 0.4, "mlp": 0.3},
               "guarantee": {"epsilon": 10, "noise_multiplier": 0.6, "steps": 10}, "fd": {"value": 1.0, "description": "FD"},
               "timings": timings}
        return next(line for line in markdown({"runs": {"lora_eps10": run}, "run_kind": "reduced", "commands": []}, {}).split("\n")
                    if line.startswith("| lora_eps10"))

    live = {"train": {"cpu_s": 1.0, "wall_s": 2.99}, "sample": {"cpu_s": 1.0, "wall_s": 2.88}, "evaluate": {"cpu_s": 1.0, "wall_s": 0.43}}
    stored = json.loads(json.dumps(live, sort_keys=True))
    assert list(stored) != list(live)
    assert row(live) == row(stored)
