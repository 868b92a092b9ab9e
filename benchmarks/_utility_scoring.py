"""The scoring protocol of benchmarks/utility.py, shared by every run: the real test set, the FD reference
statistics (cached beside the runs) and the extractor, loaded once; a call scores one synthetic set."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from _utility_report import CHANNELS, CLASSIFIERS, DATASET, RESOLUTION

from dpdiff.data import load_source
from dpdiff.data.transforms import images_to_tensor
from dpdiff.evaluation import FD_NAME, evaluate_downstream, feature_statistics, frechet_distance
from dpdiff.evaluation.frechet import cached_statistics, fd_description


class Evaluator:
    """The real test set, the FD reference sample and the extractor, loaded once for every run."""

    def __init__(self, args):
        from dpdiff.features import load_feature_extractor

        self.args, self.device = args, resolve_device(args)
        test = load_source(DATASET, "test", limit=args.test_limit, seed=args.seed)
        self.class_names = list(test.class_names)
        self.x_test = images_to_tensor(test.dataset["image"], RESOLUTION, CHANNELS)
        self.y_test = torch.tensor(test.dataset["label"])
        self.fd_n = min(args.num_fd_samples, len(self.x_test))
        self.extractor = load_feature_extractor("efficientnet_lite0", input_size=args.fd_input_size, batch_size=64,
                                                device=self.device)
        self.fd_real = self._real_statistics()

    def _real_statistics(self) -> tuple:
        """The reference side of FD, computed once per settings and kept beside the runs: 2,000 images at
        224 px cost minutes of CPU, and every invocation of a split benchmark needs the same ones."""
        a = self.args
        key = {"real": DATASET, "split": "test", "real_limit": a.test_limit, "seed": a.seed, "num_images": self.fd_n,
               "image_format": [CHANNELS, RESOLUTION, RESOLUTION], "extractor": "efficientnet_lite0", "input_size": a.fd_input_size}
        path = Path(a.output_dir) / f"fd-real-stats-{DATASET}-test{a.test_limit or 'all'}-n{self.fd_n}-px{a.fd_input_size}-seed{a.seed}.npz"
        return cached_statistics(self.x_test[self._pick(len(self.x_test))], self.extractor, path, key)[0]

    def _pick(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed))[: self.fd_n]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        scores = evaluate_downstream(images, labels, self.x_test, self.y_test, CLASSIFIERS, epochs=self.args.eval_epochs,
                                     seed=self.args.seed, class_names=self.class_names, device=self.device,
                                     repeats=self.args.eval_repeats)
        picked = images[self._pick(len(images))]
        fd = {"value": frechet_distance(*self.fd_real, *feature_statistics(picked, self.extractor)), "metric": FD_NAME,
              "num_real": self.fd_n, "num_synthetic": len(picked), "description": fd_description(
                  self.fd_n, len(picked), RESOLUTION, CHANNELS, self.extractor.input_size, "test")}
        spread = {"accuracy_std": {c: scores[c]["accuracy_std"] for c in CLASSIFIERS}} if self.args.eval_repeats > 1 else {}
        return {"accuracy": {c: scores[c]["accuracy"] for c in CLASSIFIERS}, **spread, "fd": fd,
                "train_count_per_class": scores["train_count_per_class"], "num_classifier_train_images": len(images)}


def resolve_device(args) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device


def score_runs(args, evaluate: Evaluator) -> dict:
    """Score finished dpdiff runs (a `finetune` or `tune` output folder each, e.g. the demo's) with this protocol,
    without training: --num_per_class images per class from the run's own class prompts, then the classifiers and
    FD. The runs keep their own guarantee (read from their privacy.json); the rows go to OUTPUT_DIR/scored_runs.json,
    not to the `## Utility` table (those runs were not trained by this benchmark's settings)."""
    from _utility_report import load_images

    from dpdiff.io import write_json
    from dpdiff.sampling import sample_dataset

    out = Path(args.output_dir)
    scored = {}
    for run_dir in map(Path, args.score_runs):
        privacy = json.loads((run_dir / "privacy.json").read_text())
        synthetic = out / "scored" / run_dir.resolve().name
        start = time.process_time()
        sample_dataset(run_dir, synthetic, num_per_class=args.num_per_class, seed=args.seed, resolution=RESOLUTION,
                       guidance_scale=args.guidance_scale, num_inference_steps=args.inference_steps, batch_size=50,
                       device=resolve_device(args), overwrite=True)
        sample_cpu_s = time.process_time() - start
        scores = evaluate(*load_images(synthetic, evaluate.class_names))
        guarantee = {k: privacy.get(k) for k in ("epsilon", "delta", "accountant", "noise_multiplier", "steps", "sample_rate",
                                                 "num_examples")}
        scored[str(run_dir)] = {**scores, "guarantee": guarantee, "search": "search" in privacy,
                                "num_per_class": args.num_per_class, "inference_steps": args.inference_steps,
                                "guidance_scale": args.guidance_scale, "sample_cpu_s": round(sample_cpu_s, 1)}
        acc = scores["accuracy"]
        print(f"[utility] {run_dir}: eps {guarantee['epsilon']:.3g}  CNN {100 * acc['cnn']:.1f} / LogReg "
              f"{100 * acc['logreg']:.1f} / MLP {100 * acc['mlp']:.1f}%  FD {scores['fd']['value']:.1f}", flush=True)
        write_json(out / "scored_runs.json", scored)
    if args.score_section:
        from _docs import update_section

        update_section(args.score_section, scored_table(scored, args), Path(args.benchmarks_md))
    return scored


def scored_table(scored: dict, args) -> str:
    """The scored runs side by side: each one's own guarantee (a search's covers all its trials) and its flags."""
    import yaml

    rows = []
    for run_dir, r in scored.items():
        flags = yaml.safe_load((Path(run_dir) / "training_config.yaml").read_text())
        g, acc = r["guarantee"], r["accuracy"]
        kind = "tune (best of a secret number of trials)" if r["search"] else "finetune"
        accountant = str(g["accountant"]).split(" ")[0]
        rows.append(f"| {Path(run_dir).name} | {kind} | {g['epsilon']:.3f} ({accountant}) | {g['noise_multiplier']:.3f} | "
                    f"{g['steps']} | {g['num_examples']} | {flags['learning_rate']:.3g} | {flags['max_grad_norm']:g} | "
                    f"{flags['rank']} | {100 * acc['cnn']:.1f} | {100 * acc['logreg']:.1f} | {100 * acc['mlp']:.1f} | "
                    f"{r['fd']['value']:.1f} |")
    return "\n".join([
        f"`python benchmarks/utility.py --score_runs RUN ... --score_section {args.score_section}`: finished runs scored with "
        f"the `## Utility` protocol ({args.num_per_class} images per class, {args.inference_steps} DDIM steps, guidance "
        f"{args.guidance_scale:g}; the three classifiers on the real test set; FD 2000 v 2000). ε is each run's whole "
        "guarantee at δ = 1e-5: a search's covers its score release, every trial and the selection (what the "
        "comparison shows and why: docs/privacy.md, *Hyperparameter search*).", "",
        "| run | kind | ε total (accountant) | σ | steps | training examples | lr | C | rank | CNN % | LogReg % | MLP % | FD |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows])
