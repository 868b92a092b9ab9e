"""The `## Utility` section of docs/benchmarks.md: the table, the accuracy/FD plots against epsilon and a
sample grid per method, from the results of benchmarks/utility.py. Also the constants both share."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from _docs import update_section

from dpdiff.data.transforms import images_to_tensor
from dpdiff.evaluation import load_synthetic
from dpdiff.io import atomic_path, write_json
from dpdiff.training.arguments import DEFAULT_LEARNING_RATES

METHODS = ("mepf", "attention", "lora", "full")
DP_SGD_METHODS = ("attention", "lora", "full")  # the diffusion methods (DP-SGD through dpdiff.training)
REFERENCES = ("real", "vae_reconstruction", "nonprivate_lora")
IMAGE_REFERENCES = ("real", "vae_reconstruction")  # classifiers trained on (copies of) private images: no samples
CLASSIFIERS = ("cnn", "logreg", "mlp")
DATASET, RESOLUTION, CHANNELS = "fashion_mnist", 28, 1
# published Fashion-MNIST 28px, delta=1e-5, train on synthetic / test on real (accuracy %)
PUBLISHED = [
    {"name": "DPDM (Dockhorn et al.)", "epsilon": 10, "accuracy": {"cnn": 86.2}},
    {"name": "DPDM (Dockhorn et al.)", "epsilon": 1, "accuracy": {"cnn": 79.4}},
    {"name": "DP-MEPF (Harder et al.)", "epsilon": 10, "accuracy": {"logreg": 75.7, "mlp": 76.0}},
    {"name": "DP-MERF (Harder et al.)", "epsilon": 10, "accuracy": {"cnn": 75.4}},
]
# DPImageBench (one protocol for every method: 60k synthetic images, ImageNet32 pretraining, GPUs; its
# classifier's accuracy, in the CNN column)
DPIMAGEBENCH = {"DP-FETA": (81.7, 87.3), "PrivImage": (79.9, 87.1), "DPDM": (76.4, 85.6), "DP-LoRA": (63.5, 83.8),
                "DP-LDM": (62.3, 86.3), "DP-MERF": (62.2, 62.2)}
PUBLISHED += [{"name": name, "epsilon": eps, "accuracy": {"cnn": acc}, "protocol": "DPImageBench protocol"}
              for name, pair in DPIMAGEBENCH.items() for eps, acc in zip((1, 10), pair)]


def load_images(folder: Path, class_names) -> tuple[torch.Tensor, torch.Tensor]:
    syn = load_synthetic(str(folder), class_names)
    return images_to_tensor(syn.images, RESOLUTION, CHANNELS), torch.as_tensor(syn.labels, dtype=torch.long)


def series(runs: dict) -> dict[str, list[dict]]:
    """The generators, one series per method (and per base pipeline and per timestep bias when merged runs
    used several): a line in the plots and a sample grid each, so runs on a wider preset or with another
    training recipe are never drawn as points of the shipped one's."""
    generators = [r for r in runs.values() if r["method"] not in IMAGE_REFERENCES]
    bases = {str(r["settings"].get("base_model")) for r in generators}
    short = {b: Path(b).name for b in bases}
    if len(set(short.values())) < len(bases):  # two folders of the same name: the whole path tells them apart
        short = {b: b.strip("/").replace("/", "_") for b in bases}
    biases = {r["settings"].get("timestep_bias_strategy", "none") for r in generators}
    out: dict[str, list[dict]] = {}
    for method in [*METHODS, "nonprivate_lora"]:
        for r in runs.values():
            if r["method"] == method:
                name = method if len(bases) < 2 else f"{method}_{short[str(r['settings'].get('base_model'))]}"
                bias = r["settings"].get("timestep_bias_strategy", "none")
                out.setdefault(name + (f"_bias-{bias}" if len(biases) > 1 and bias != "none" else ""), []).append(r)
    return out


RESULTS_FILE = "utility_results.json"  # beside the plots: the section can be rebuilt from the repository alone


def render_docs(results: dict, docs_dir: Path, md_path: Path) -> None:
    """Plots under docs_dir and the `## Utility` section of md_path (links relative to it), and the results it
    shows as docs_dir/utility_results.json, so `--report_from` that file (plus new runs) rebuilds it from a clean
    clone. A sample grid whose synthetic set is gone (outputs/ is not in git) keeps the PNG it made before."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs, kind = results["runs"], results["run_kind"]
    refs = {k: r for k, r in runs.items() if r["method"] in REFERENCES}
    tag = {"smoke": " [SMOKE RUN: meaningless numbers]", "reduced": " [reduced run]", "full": ""}[kind]
    plots, value = {}, {"accuracy": lambda r: 100 * r["accuracy"]["cnn"], "fd": lambda r: r["fd"]["value"]}
    lines = series(runs)
    series_of = {id(r): name for name, members in lines.items() for r in members}
    for metric, ylabel in (("accuracy", "CNN accuracy on real test (%)"), ("fd", "FD (EfficientNet-Lite0)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, members in lines.items():
            points = sorted((r["target_epsilon"], value[metric](r)) for r in members if r["method"] in METHODS)
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        for i, (key, r) in enumerate(refs.items()):
            ax.axhline(value[metric](r), ls="--", color=f"C{5 + i}", label=series_of.get(id(r), key))
        protocol = {p["name"]: p.get("protocol", "paper") for p in PUBLISHED}
        for name, marker in zip(protocol, "xP*vD^<>sph"):
            points = [(p["epsilon"], p["accuracy"]["cnn"]) for p in PUBLISHED if p["name"] == name and "cnn" in p["accuracy"]]
            if metric == "accuracy" and points:
                ax.scatter(*zip(*points), marker=marker, color="k", zorder=3, label=f"{name}, {protocol[name]}")
        ax.set(xscale="log", xlabel="epsilon (delta = 1e-5)", ylabel=ylabel, title=f"Fashion-MNIST{tag}")
        ax.legend(fontsize=7)
        plots[metric] = docs_dir / f"utility_{metric}.png"
        with atomic_path(plots[metric]) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    from dpdiff.imaging import save_grid, to_pil

    for name, members in lines.items():
        mine = sorted((r["target_epsilon"] or 0, r["synthetic_dir"]) for r in members if r.get("synthetic_dir"))
        if mine and not Path(mine[-1][1]).is_dir() and (docs_dir / f"utility_samples_{name}.png").is_file():
            plots[name] = docs_dir / f"utility_samples_{name}.png"
        elif mine:  # the largest epsilon: one row per class
            images, labels = load_images(Path(mine[-1][1]), results["class_names"])
            classes = range(len(results["class_names"]))
            k = min(8, *[int((labels == c).sum()) for c in classes])
            pick = [i for c in classes for i in (labels == c).nonzero().flatten()[:k].tolist()]
            plots[name] = docs_dir / f"utility_samples_{name}.png"
            save_grid(to_pil(images[pick]), plots[name], nrow=k, scale=2)
    write_json(docs_dir / RESULTS_FILE, results)
    update_section("Utility", markdown(results, {k: os.path.relpath(v, md_path.parent) for k, v in plots.items()}), md_path)


def markdown(results: dict, plots: dict) -> str:
    runs, kind = results["runs"], results["run_kind"]
    s = next(iter(runs.values()))["settings"] if runs else {}

    def cpu(r, ph):  # a resumed training's process timed only the steps after its checkpoint: say so
        timing = r["timings"].get(ph) or {}
        if timing.get("cpu_s") is None:
            return "–"
        return f"{timing['cpu_s'] / 60:.2f}" + (f" (steps {timing['resumed_at_step']}+ only)" if timing.get("resumed_at_step") else "")

    rows = []
    # settings that differ between the merged runs are named on the rows of the diffusion trainings they apply to
    # (the non-private LoRA reference included: it runs the same schedule)
    varying = {k for r in runs.values() for k in r["settings"]
               if len({json.dumps(q["settings"].get(k)) for q in runs.values()}) > 1}
    for key, r in runs.items():
        method = "lora" if r["method"] == "nonprivate_lora" else r["method"]
        own = {k: r["settings"].get(k) for k in sorted(varying)} if method in DP_SGD_METHODS else {}
        if r["method"] == "vae_reconstruction" and "base_model" in varying:  # the ceiling of THAT pipeline's VAE
            own = {"base_model": r["settings"].get("base_model")}
        if "learning_rate" in own and own["learning_rate"] is None:  # None ran the method's default: name it
            own["learning_rate"] = DEFAULT_LEARNING_RATES[method]
        own = {k: v for k, v in own.items() if v is not None and (method == "lora" or k not in ("rank", "lora_target_modules"))
               and not (r["method"] == "nonprivate_lora" and k in ("max_grad_norm", "noise_multiplicity"))}  # it clips nothing, K = 1
        label = key + (" (" + ", ".join(f"{k}={' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in own.items()) + ")" if own else "")
        if r["method"] in IMAGE_REFERENCES:  # a ceiling holds for its training-set size: name it
            label += f" ({r['num_classifier_train_images']:,} images)"
        g = r.get("guarantee") or {}
        spent = f"{g['epsilon']:.3g}" if g.get("epsilon") is not None else "none (not private)"
        sigma = f"{g['noise_multiplier']:.3g}" if g.get("noise_multiplier") is not None else "–"
        steps = g.get("steps") if g.get("steps") is not None else "–"
        std = r.get("accuracy_std") or {}  # --eval_repeats: the mean over the classifier seeds, ± their std
        acc = " | ".join(f"{100 * r['accuracy'][c]:.1f}" + (f" ± {100 * std[c]:.1f}" if c in std else "") for c in CLASSIFIERS)
        wall = math.fsum(t["wall_s"] for t in r["timings"].values()) / 60  # order-free: a merged report rounds alike
        target = f"{r['target_epsilon']:g}" if r["target_epsilon"] is not None else "–"
        rows.append(f"| {label} | {target} | {spent} | {sigma} | {steps} | {acc} | {r['fd']['value']:.2f} | {cpu(r, 'train')} | "
                    f"{cpu(r, 'sample')} | {cpu(r, 'evaluate')} | {wall:.2f} |")
    for p in PUBLISHED:
        acc = " | ".join(f"{p['accuracy'][c]:.1f}" if c in p["accuracy"] else "" for c in CLASSIFIERS)
        rows.append(f"| {p['name']}, {p.get('protocol', 'paper')} | {p['epsilon']} | {p['epsilon']} | | | {acc} | | | | | |")
    first = next(iter(runs.values()), None)
    fd_label = first["fd"]["description"] if first else ""
    warning = {"smoke": "**SMOKE RUN: every number below comes from a few steps on a handful of images and means nothing.**",
               "reduced": "**Reduced run** (not the complete benchmark): see the settings below.",
               "full": "Complete benchmark."}[kind]

    def shared(keys, text):  # a setting the merged runs do not share is named on each row instead
        return "(see each row)" if varying & set(keys) else text

    schedule = f"{s['max_steps']} steps" if s.get("max_steps") else f"{s.get('epochs')} epochs"
    if varying & {"max_steps", "epochs"} == {"max_steps"}:  # a row with max_steps names it; the others ran the epochs
        schedule = f"{s.get('epochs')} epochs (or the max_steps a row names)"
    # None = each method's own default, which the reader should not have to look up in the code
    lr = s.get("learning_rate") or "each method's default (" + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LEARNING_RATES.items()) + ")"
    # which layers LoRA adapts moves its score by ~10 points (`### Utility levers` (under `## History`)): always said, never left to a command
    lora = (f"LoRA rank {shared(('rank',), s.get('rank'))} on {shared(('lora_target_modules',), ' '.join(s.get('lora_target_modules') or []))}; "
            if any(r["method"] in ("lora", "nonprivate_lora") for r in runs.values()) else "")
    n = s.get("eval_repeats") or 1
    repeats = f" (each accuracy the mean over {n} classifier seeds ± their std)" if n > 1 else ""
    if "eval_repeats" in varying:
        repeats = " (an accuracy with ± is the mean over several classifier seeds ± their std)"
    return "\n".join([
        warning, "",
        f"Private data: {'a seeded random subset of ' + str(s['max_train_samples']) + ' images of ' if s.get('max_train_samples') else ''}"
        f"Fashion-MNIST train (60,000 images), "
        f"delta = {s.get('delta')}; base pipeline {shared(('base_model',), '`' + str(s.get('base_model')) + '`')} (pretrained on public data only); "
        f"DP-SGD for {shared(('epochs',), schedule)} at batch {shared(('batch_size',), s.get('batch_size'))}, "
        f"clipping norm {shared(('max_grad_norm',), s.get('max_grad_norm'))}, "
        f"learning rate {shared(('learning_rate',), lr)} (AdamW); {lora}"
        f"MEPF generator {s.get('mepf_generator_steps')} steps; {s.get('num_per_class')} synthetic "
        f"images per class ({s.get('inference_steps')} DDIM steps, guidance {s.get('guidance_scale')}), resized to 28x28 grey. "
        f"Classifiers trained on the synthetic set, tested on {'a ' + str(s.get('test_limit')) + '-image subset of ' if s.get('test_limit') else ''}"
        f"the real Fashion-MNIST test set{repeats}; FD: {fd_label}. Times are CPU minutes of the process "
        "(all threads). `real` trains the classifiers on private training images (its row says how many: as many per "
        "class as each synthetic set, the ceiling at that size); `vae_reconstruction` on the same images after the base "
        "pipeline's frozen VAE (encode, decode): the ceiling of any method that generates through that autoencoder; "
        "`nonprivate_lora` "
        "is the same LoRA schedule WITHOUT clipping or noise (no guarantee: what DP costs).", "",
        "| run | target ε | spent ε | σ | DP steps | CNN % | LogReg % | MLP % | FD | train CPU min | sample CPU min | eval CPU min | wall min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows, "",
        ("Published rows: the papers' own settings (full 60k, GPU-long training), δ = 1e-5; `DPImageBench protocol` rows: "
         "DPImageBench's one protocol for every method (a classifier trained on 60k synthetic images, in the CNN "
         "column; ImageNet32 pretraining; GPUs), not ours."), "",
        *[f"![{k}]({v})" for k, v in plots.items()], "",
        "Commands of these runs:", "", "```bash", *results["commands"], "```", "",
        "The complete benchmark (all methods, ε ∈ {1, 10}, the three references, 6,000 synthetic images per class; GPU-sized). Rerun the same command to "
        "go on after an interruption: finished runs are kept, an interrupted training continues from its latest "
        "checkpoint with the ε it had spent:", "",
        "```bash", "python benchmarks/utility.py --skip_existing --checkpointing_steps 50", "```", "",
        f"`docs/{RESULTS_FILE}` holds the results this section shows. To add a run without rerunning these, pass it "
        "with the new run's results (a run with other settings under a name already there is added as NAME_2; the same run twice is refused):", "",
        "```bash", f"python benchmarks/utility.py --report_from docs/{RESULTS_FILE} outputs/NEW/results.json", "```",
    ])
