"""Which levers move utility, measured cheaply: train one configuration with the DP engine on
Fashion-MNIST and score it at a few step counts along the way.

    python benchmarks/utility_levers.py run --tag full-clip --method full --learning_rate 5e-4 --steps 200
    python benchmarks/utility_levers.py run --tag lora-eps10 --method lora --target_epsilon 10 --steps 400
    python benchmarks/utility_levers.py evaluate --tag lora-eps10   # the finished run, scored as in `## Utility`
    python benchmarks/utility_levers.py report        # table + plot -> docs/benchmarks.md `## Utility levers`

Score at each step count (EMA weights): `per_class` images per class, 20 DDIM steps, guidance 2, then
- `agree`: how often a CNN trained on the REAL training set (3 epochs, ~89% on the test set) labels a
  synthetic image as the class it was generated for (class consistency, no training on synthetic);
- `cnn`: the benchmark's small CNN trained on those synthetic images, tested on 2,000 real test images.
Both are cheap proxies of `benchmarks/utility.py`; its numbers are the reference ones.

`--target_epsilon 0` is clipping WITHOUT noise: no guarantee, it shows what the noise costs.
Otherwise sigma is planned for exactly `--steps` steps at (eps, delta=1e-5) on the 60k images."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # a dependency ships a top-level `benchmarks` package

from _docs import update_section  # noqa: E402

from dpdiff.adapters import DEFAULT_LORA_TARGETS  # noqa: E402
from dpdiff.data import load_source  # noqa: E402
from dpdiff.data.transforms import images_to_tensor  # noqa: E402
from dpdiff.io import atomic_path, write_json  # noqa: E402
from dpdiff.training.arguments import DEFAULT_MAX_GRAD_NORM  # noqa: E402

DELTA, TEST_IMAGES, SAMPLER_STEPS = 1e-5, 2000, 20


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--tag", required=True, help="name of this configuration (a folder under --output_dir)")
    a("--method", choices=("lora", "attention", "full"), default="lora")
    a("--learning_rate", type=float, default=2e-3)
    a("--steps", type=int, default=200, help="logical DP-SGD steps")
    a("--batch_size", type=int, default=128)
    a("--physical_batch_size", type=int, default=64)
    a("--target_epsilon", type=float, default=0.0, help="0: clipping only, no noise (NOT private)")
    a("--max_grad_norm", type=float, default=DEFAULT_MAX_GRAD_NORM, help="C (the library default; see docs/recipes.md)")
    a("--noise_multiplicity", type=int, default=1)
    a("--timestep_bias_strategy", choices=("none", "earlier", "later", "range"), default="none")
    a("--timestep_bias_multiplier", type=float, default=1.0)
    a("--timestep_bias_portion", type=float, default=0.25)
    a("--rank", type=int, default=8)
    a("--lora_target_modules", nargs="+", default=["to_q", "to_k", "to_v", "to_out.0"])
    a("--train_condition_embedder", action="store_true")
    a("--ema_decay", type=float, default=0.999)
    a("--prompt_template", default=None, help="caption template ({class_name}, {article}, {label}); default: 'a photo of {article} {class_name}'")
    a("--guidance_scale", type=float, default=2.0)
    a("--per_class", type=int, default=40, help="synthetic images per class at each evaluation")
    a("--eval_at", type=int, nargs="+", default=[100, 200], help="step counts to score (0: the base model)")
    a("--base_model", default="dpdiff-tiny")


def real_classifier(output_dir: Path):
    """The CNN trained on the real training set (cached): the judge of class consistency."""
    from dpdiff.evaluation.classifiers import build_classifier, train_classifier

    path = output_dir / "real_cnn.safetensors"
    torch.manual_seed(0)
    model = build_classifier("cnn", 1, 28, 10)
    if path.exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
        return model.eval()
    train = load_source("fashion_mnist", "train")
    x, y = images_to_tensor(train.dataset["image"], 28, 1), torch.tensor(train.dataset["label"])
    train_classifier(model, x, y, epochs=3, seed=0, desc="real cnn")
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(model.state_dict(), str(tmp))
    return model.eval()


def run(args) -> None:
    from diffusers import DDIMScheduler
    from diffusers.training_utils import EMAModel

    from dpdiff.adapters import prepare_trainable, save_trained
    from dpdiff.pipelines import load_pipeline
    from dpdiff.pipelines.preset import training_scheduler
    from dpdiff.privacy import accounting
    from dpdiff.privacy.diffusion_loss import timestep_weights
    from dpdiff.privacy.engine import DPDiffusionEngine
    from dpdiff.training.latent_cache import build_latent_cache

    out = Path(args.output_dir) / args.tag
    out.mkdir(parents=True, exist_ok=True)
    judge = real_classifier(Path(args.output_dir))
    source = load_source("fashion_mnist", "train", prompt_template=args.prompt_template)
    class_prompts = source.class_prompts
    q = args.batch_size / len(source)
    sigma = accounting.noise_multiplier_for(args.target_epsilon, q, args.steps, DELTA) if args.target_epsilon > 0 else 0.0
    pipe = load_pipeline(args.base_model)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.train()
    summary = prepare_trainable(unet, args.method, rank=args.rank, target_modules=args.lora_target_modules,
                                train_condition_embedder=args.train_condition_embedder)
    cache = build_latent_cache(pipe, source, 32, cond_dropout=0.1, seed=0, show_progress=False)
    params = [p for p in unet.parameters() if p.requires_grad]
    engine = DPDiffusionEngine(unet, training_scheduler(pipe), torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0),
                               cache, batch_size=args.batch_size, physical_batch_size=args.physical_batch_size,
                               noise_multiplier=sigma, max_grad_norm=args.max_grad_norm,
                               noise_multiplicity=args.noise_multiplicity,
                               timestep_weights=timestep_weights(1000, args.timestep_bias_strategy,
                                                                 args.timestep_bias_multiplier, args.timestep_bias_portion))
    ema = EMAModel(params, decay=args.ema_decay) if args.ema_decay > 0 else None
    test = real_test_set()
    sampler = DDIMScheduler.from_config(pipe.scheduler.config)
    config = {**{k: v for k, v in vars(args).items() if k != "command"}, "noise_multiplier": sigma, "sample_rate": q,
              "trainable_params": summary.trainable_params}
    write_json(out / "config.json", config)
    records, start = [], time.process_time()

    def score(step: int) -> None:
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        unet.eval()
        pipe.scheduler = sampler
        scores = score_pipeline(pipe, class_prompts, args.per_class, args.guidance_scale, SAMPLER_STEPS, judge, test,
                                out / f"samples-{step}.png")
        if ema is not None:
            ema.restore(params)
        unet.train()
        records.append({"step": step, **scores, "train_cpu_s": round(time.process_time() - start, 1)})
        print(records[-1], flush=True)
        write_json(out / "results.json", {"config": config, "scores": records})

    if 0 in args.eval_at:
        score(0)
    for step in range(1, args.steps + 1):
        engine.step()
        if ema is not None:
            ema.step(params)
        if step in args.eval_at:
            score(step)
    if ema is not None:
        ema.copy_to(params)  # keep the released (EMA) weights: `evaluate` scores them with the benchmark's protocol
    save_trained(unet, out / "weights", args.method)


def real_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    test = load_source("fashion_mnist", "test", limit=TEST_IMAGES, seed=0)
    return images_to_tensor(test.dataset["image"], 28, 1), torch.tensor(test.dataset["label"])


def score_pipeline(pipe, class_prompts, per_class: int, guidance_scale: float, steps: int, judge, test, grid: Path) -> dict:
    """Sample `per_class` images per class prompt (fixed seed) and score them: agree and cnn."""
    from dpdiff.evaluation.classifiers import evaluate_downstream, predict
    from dpdiff.imaging import save_grid

    images, labels, generator = [], [], torch.Generator().manual_seed(123)
    for label, prompt in enumerate(class_prompts):
        with torch.no_grad():
            images += pipe([prompt] * per_class, num_inference_steps=steps, guidance_scale=guidance_scale,
                           generator=generator, height=32, width=32).images
        labels += [label] * per_class
    x, y = images_to_tensor([im.convert("L") for im in images], 28, 1), torch.tensor(labels)
    cnn = evaluate_downstream(x, y, *test, classifiers=["cnn"], epochs={"cnn": 30}, seed=0)["cnn"]["accuracy"]
    save_grid(images[:: max(1, per_class // 8)], grid, nrow=min(8, per_class), scale=2)
    return {"agree": round(float((predict(judge, x) == y).float().mean()), 4), "cnn": round(float(cnn), 4)}


def sampling(args) -> None:
    """Score a finished dpdiff run at several guidance scales and DDIM step counts (no retraining)."""
    from dpdiff.sampling.pipeline import load_finetuned_pipeline
    from dpdiff.sampling.records import read_run, resolve_run

    run = read_run(resolve_run(args.run_dir))
    pipe = load_finetuned_pipeline(args.run_dir)
    judge, test = real_classifier(Path(args.output_dir)), real_test_set()
    out = Path(args.output_dir) / f"sampling-{args.tag}"
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for steps in args.num_inference_steps:
        for scale in args.guidance_scales:
            scores = score_pipeline(pipe, run.class_prompts, args.per_class, scale, steps, judge, test,
                                    out / f"samples-g{scale:g}-s{steps}.png")
            records.append({"guidance_scale": scale, "num_inference_steps": steps, **scores})
            print(records[-1], flush=True)
            write_json(out / "sampling.json", {"run": str(args.run_dir), "method": run.method,
                                               "epsilon": run.privacy.get("epsilon"), "scores": records})


def evaluate(args) -> None:
    """Score a finished `run`'s released weights with the protocol of benchmarks/utility.py (its
    classifiers on `num_per_class` images per class, FD against the real test set), so a lever found
    with the proxy lands on the same scale as the `## Utility` table."""
    from diffusers import DDIMScheduler

    from dpdiff.pipelines import load_pipeline
    from dpdiff.sampling.generate import generate, plan_requests
    from _utility_report import CHANNELS, RESOLUTION
    from _utility_scoring import Evaluator

    run_dir = Path(args.output_dir) / args.tag
    config = json.loads((run_dir / "config.json").read_text())
    if not (run_dir / "weights").is_dir():
        sys.exit(f"{run_dir} has no weights/: `run` saves them when it finishes")
    pipe = load_pipeline(config["base_model"])
    if config["method"] == "lora":
        pipe.load_lora_weights(run_dir / "weights")  # the stock diffusers loader, as users load it
    else:
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(run_dir / "weights", subfolder="unet")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    class_prompts = load_source("fashion_mnist", "test", limit=10, prompt_template=config.get("prompt_template")).class_prompts
    requests, _ = plan_requests(class_prompts, args.num_per_class, None, 1, seed=0)
    start = time.process_time()
    images = list(generate(pipe, requests, args.guidance_scale, args.inference_steps, batch_size=50))
    sample_cpu_s = time.process_time() - start
    x, y = images_to_tensor([im.convert("L") for im in images], RESOLUTION, CHANNELS), torch.tensor([r.label for r in requests])
    settings = argparse.Namespace(device="cpu", test_limit=None, seed=0, num_fd_samples=2000, fd_input_size=224,
                                  output_dir=args.output_dir, eval_epochs=None)
    scores = Evaluator(settings)(x, y)
    write_json(run_dir / "evaluation.json", {**scores, "num_per_class": args.num_per_class, "inference_steps": args.inference_steps,
                                             "guidance_scale": args.guidance_scale, "sample_cpu_s": round(sample_cpu_s, 1),
                                             "train_cpu_s": full_training_cpu_s(run_dir, config)})
    print(scores["accuracy"], scores["fd"]["value"])


def full_training_cpu_s(run_dir: Path, config: dict) -> float | None:
    """CPU seconds of all `steps` (scoring excluded), known when the last step was scored; None otherwise."""
    last = json.loads((run_dir / "results.json").read_text())["scores"][-1]
    return last["train_cpu_s"] if last["step"] == config["steps"] else None


def load_runs(output_dir: Path) -> dict:
    runs = {}
    for path in sorted(output_dir.glob("*/results.json")):
        runs[path.parent.name] = json.loads(path.read_text())
    return runs


ATTENTION_TARGETS = set(DEFAULT_LORA_TARGETS)
EVERY_LAYER_KIND = ATTENTION_TARGETS | {"proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj"}


def trained(config: dict) -> str:
    if config["method"] != "lora":
        return config["method"]
    targets = set(config["lora_target_modules"])
    kind = {frozenset(ATTENTION_TARGETS): "attention", frozenset(EVERY_LAYER_KIND): "every layer kind"}.get(
        frozenset(targets), ",".join(sorted(targets)))
    return f"LoRA r={config['rank']} on {kind}"


def other_settings(config: dict) -> str:
    """The settings a run changed from the defaults of `run` (the levers it pulled)."""
    out = []
    if config.get("noise_multiplicity", 1) > 1:
        out.append(f"K={config['noise_multiplicity']}")
    if config.get("timestep_bias_strategy", "none") != "none":
        out.append(f"timesteps: {config['timestep_bias_strategy']} {config['timestep_bias_portion']:g} "
                   f"x{config['timestep_bias_multiplier']:g}")
    if config.get("prompt_template"):
        out.append(f"prompts '{config['prompt_template']}'")
    if config.get("train_condition_embedder"):
        out.append("condition embedder")
    return ", ".join(out) or "–"


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = load_runs(Path(args.output_dir))
    if not runs:
        sys.exit(f"no runs under {args.output_dir}; start one with `run`")
    rows = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.get_cmap("tab20").colors
    for tag, r in runs.items():
        c, scores = r["config"], r["scores"]
        eps = f"{c['target_epsilon']:g} (σ {c['noise_multiplier']:.2f})" if c["target_epsilon"] > 0 else "none (clip only)"
        for s in scores:
            rows.append(f"| {tag} | {trained(c)} | {c['trainable_params']:,} | {c['learning_rate']:g} | {c['batch_size']} | "
                        f"{c['max_grad_norm']:g} | {eps} | {other_settings(c)} | {s['step']} | {100 * s['agree']:.1f} | "
                        f"{100 * s['cnn']:.1f} |")
        private = c["target_epsilon"] > 0  # clip-only runs (no noise, no guarantee) dashed
        ax.plot([s["step"] for s in scores], [100 * s["cnn"] for s in scores], marker="o", ls="-" if private else "--",
                color=colors[len(ax.lines) % len(colors)], label=tag + ("" if private else " (no noise)"))
    ax.set(xlabel="DP-SGD steps", ylabel="CNN accuracy on real test (%)", title="Utility levers (Fashion-MNIST, proxy)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    plot = Path(args.docs_dir) / "utility_levers.png"
    with atomic_path(plot) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    sampling_rows = []
    for path in sorted(Path(args.output_dir).glob("sampling-*/sampling.json")):
        r = json.loads(path.read_text())
        for s in r["scores"]:
            sampling_rows.append(f"| {path.parent.name[len('sampling-'):]} | {r['method']} | {r['epsilon']:.3g} | "
                                 f"{s['guidance_scale']:g} | {s['num_inference_steps']} | {100 * s['agree']:.1f} | {100 * s['cnn']:.1f} |")
    sampling_table = [] if not sampling_rows else [
        "", "Sampling levers on finished runs (`utility_levers.py sampling`: same scores, no retraining):", "",
        "| run | method | ε spent | guidance scale | DDIM steps | agree % | CNN % |", "|---|---|---:|---:|---:|---:|---:|",
        *sampling_rows]
    evaluated = []
    for tag, r in runs.items():
        path = Path(args.output_dir) / tag / "evaluation.json"
        if path.exists():
            e, c = json.loads(path.read_text()), r["config"]
            acc = e["accuracy"]
            evaluated.append(f"| {tag} | {trained(c)} | {c['batch_size']} | {c['max_grad_norm']:g} | {c['target_epsilon']:g} | "
                             f"{c['steps']} | {100 * acc['cnn']:.1f} | {100 * acc['logreg']:.1f} | {100 * acc['mlp']:.1f} | "
                             f"{e['fd']['value']:.1f} | {'–' if e['train_cpu_s'] is None else round(e['train_cpu_s'] / 60)} |")
    evaluated_table = [] if not evaluated else [
        "", "Finished runs scored with the protocol of `## Utility` (`utility_levers.py evaluate`: 300 images per class, "
        "25 DDIM steps, guidance 2, the three classifiers on the full real test set, FD (EfficientNet-Lite0) 2000 v 2000 "
        "at 224 px):", "",
        "| run | trains | batch | C | ε | steps | CNN % | LogReg % | MLP % | FD | train CPU min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *evaluated]
    body = "\n".join([
        "Proxy scores from `benchmarks/utility_levers.py` (see its docstring): the preset, the 60k Fashion-MNIST "
        f"training images, {SAMPLER_STEPS} DDIM steps; `agree` = a real-data CNN agrees with the prompted class, "
        f"`cnn` = a CNN trained on the synthetic images, tested on {TEST_IMAGES} real test images. Smaller and noisier "
        "than `## Utility` (40 images per class): use them to rank levers, not as results.", "",
        "| run | trains | params | lr | batch | C | ε (δ=1e-5) | other | step | agree % | CNN % |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|", *rows, *evaluated_table, *sampling_table, "",
        f"![utility levers]({plot.name})",
    ])
    update_section("Utility levers", body, Path(args.benchmarks_md))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="outputs/utility-levers")
    sub = p.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="train one configuration and score it along the way"))
    smp = sub.add_parser("sampling", help="score a finished run at several guidance scales / DDIM steps")
    smp.add_argument("--run_dir", required=True, help="a dpdiff finetune output folder")
    smp.add_argument("--tag", required=True)
    smp.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    smp.add_argument("--num_inference_steps", type=int, nargs="+", default=[SAMPLER_STEPS])
    smp.add_argument("--per_class", type=int, default=40)
    ev = sub.add_parser("evaluate", help="score a finished run's weights with the protocol of benchmarks/utility.py")
    ev.add_argument("--tag", required=True)
    ev.add_argument("--num_per_class", type=int, default=300)
    ev.add_argument("--inference_steps", type=int, default=25)
    ev.add_argument("--guidance_scale", type=float, default=2.0)
    rep = sub.add_parser("report", help="write the table and plot of every run under --output_dir")
    rep.add_argument("--docs_dir", default=str(ROOT / "docs"))
    rep.add_argument("--benchmarks_md", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    {"run": run, "sampling": sampling, "evaluate": evaluate, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
