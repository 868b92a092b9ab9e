"""Downstream utility: train a classifier on the synthetic labelled set, test it on real data.

This is the protocol of the DP image-generation papers (DPDM: a small CNN; DP-MEPF/DP-MERF:
logistic regression and an MLP on raw pixels). The classifiers are written in torch and trained in
mini-batches so the 60k Fashion-MNIST case takes seconds to minutes on a CPU, not the hours of an
unbatched sklearn solver. Nothing is tuned on the test set: each model is trained for a fixed
number of epochs and scored once at the end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from dpdiff.errors import ConfigError, DataError

CLASSIFIERS = ("cnn", "logreg", "mlp")
# Fixed per-model epochs: small enough for a CPU, long enough that the real-data reference
# accuracies in docs/evaluation.md are reached (measured there).
DEFAULT_EPOCHS = {"cnn": 10, "logreg": 20, "mlp": 20}
BATCH_SIZE = 128
REPEAT_SEED_STRIDE = 1000  # repeat r of a classifier trains from seed + its offset + 1000 r
LEARNING_RATE = 1e-3


class SmallCNN(nn.Module):
    """Two conv layers (16, 32 channels) + two fully connected layers: the shape of the DPDM downstream
    CNN, narrow enough that 10 epochs on 60k images take minutes on one CPU core."""

    def __init__(self, channels: int, resolution: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = resolution // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(name: str, channels: int, resolution: int, num_classes: int) -> nn.Module:
    """`cnn` | `logreg` (one linear layer on pixels) | `mlp` (one hidden layer of 100 ReLU units,
    sklearn's MLPClassifier default, as in DP-MEPF)."""
    pixels = channels * resolution * resolution
    if name == "cnn":
        return SmallCNN(channels, resolution, num_classes)
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(pixels, num_classes))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(pixels, 100), nn.ReLU(), nn.Linear(100, num_classes))
    raise ConfigError(f"unknown classifier {name!r}; choose from {', '.join(CLASSIFIERS)}")


def _check_inputs(train_images, train_labels, test_images, test_labels, num_classes: int) -> None:
    for what, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        if images.ndim != 4:
            raise DataError(f"{what} images must be a [N, C, H, W] tensor, got shape {tuple(images.shape)}")
        if len(images) == 0:
            raise DataError(f"the {what} set is empty; downstream accuracy needs at least one labelled image")
        if len(images) != len(labels):
            raise DataError(f"{what}: {len(images)} images but {len(labels)} labels")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise DataError(f"{what} labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"train images {tuple(train_images.shape[1:])} and test images {tuple(test_images.shape[1:])} differ in "
            "shape: convert both to the same channels and resolution first (dpdiff.data.transforms.images_to_tensor)"
        )


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "classifier",
) -> nn.Module:
    """Adam, cross-entropy, shuffled mini-batches; the shuffling and initialisation are seeded."""
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    n = len(images)
    steps = epochs * ((n + BATCH_SIZE - 1) // BATCH_SIZE)
    with tqdm(total=steps, desc=f"train {desc}", leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, BATCH_SIZE):
                idx = order[start : start + BATCH_SIZE]
                x, y = images[idx].to(device), labels[idx].to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                bar.update(1)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 1024) -> torch.Tensor:
    model.to(device).eval()
    return torch.cat([model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)])


def accuracy_report(predictions: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Overall accuracy and, per class, accuracy and test count (a class absent from the test set
    gets accuracy None)."""
    correct = predictions == labels
    per_class, counts = {}, {}
    for k, name in enumerate(class_names):
        mask = labels == k
        counts[name] = int(mask.sum())
        per_class[name] = float(correct[mask].float().mean()) if counts[name] else None
    return {"accuracy": float(correct.float().mean()), "per_class_accuracy": per_class, "test_count_per_class": counts}


def evaluate_downstream(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    classifiers: Sequence[str] = CLASSIFIERS,
    epochs: int | dict[str, int] | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    repeats: int = 1,
) -> dict:
    """Train each classifier on (train_images, train_labels), e.g. the synthetic set, and report its
    accuracy on (test_images, test_labels), e.g. the real test set.

    `repeats` > 1 trains each classifier that many times from other seeds and reports the mean, with
    `accuracy_std` and `accuracy_runs`: one small CNN's accuracy moves by about a point with its seed
    alone (docs/evaluation.md), more than many differences one would like to read.

    Images are [N, C, H, W] float tensors (in [-1, 1]) with the same C, H, W on both sides;
    `epochs` is one number for all models, a per-model dict, or None for DEFAULT_EPOCHS.
    Returns {name: {accuracy, per_class_accuracy, test_count_per_class, epochs, seconds}} plus
    `train_count_per_class`, so a class the generator never produced is visible."""
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    test_labels = torch.as_tensor(test_labels, dtype=torch.long)
    unknown = [c for c in classifiers if c not in CLASSIFIERS]
    if unknown or not classifiers:
        raise ConfigError(f"unknown classifier(s) {unknown}; choose from {', '.join(CLASSIFIERS)}")
    if class_names is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if len(train_labels) and len(test_labels) else 0
        class_names = [str(k) for k in range(num_classes)]
    _check_inputs(train_images, train_labels, test_images, test_labels, len(class_names))
    per_model_epochs = _resolve_epochs(epochs, classifiers)
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}")
    channels, resolution = train_images.shape[1], train_images.shape[2]
    if train_images.shape[2] != train_images.shape[3]:
        raise DataError(f"images must be square, got {tuple(train_images.shape[2:])}")
    train_images, test_images = train_images.float(), test_images.float()

    results: dict = {
        "train_count_per_class": {name: int((train_labels == k).sum()) for k, name in enumerate(class_names)},
        "input": f"{resolution}x{resolution}, {channels} channel(s), pixels in [-1, 1]",
    }
    for offset, name in enumerate(classifiers):
        runs = []
        for r in range(repeats):
            run_seed = seed + offset + REPEAT_SEED_STRIDE * r  # repeat 0 is the single run's seed
            with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
                torch.manual_seed(run_seed)
                model = build_classifier(name, channels, resolution, len(class_names))
                start, wall = time.process_time(), time.perf_counter()
                train_classifier(model, train_images, train_labels, per_model_epochs[name], run_seed, device, desc=name)
                preds = predict(model, test_images, device)
            runs.append(accuracy_report(preds, test_labels, class_names))
            runs[-1].update(cpu_seconds=time.process_time() - start, wall_seconds=time.perf_counter() - wall)
        results[name] = _mean_of_runs(runs, per_model_epochs[name])
    return results


def _mean_of_runs(runs: list[dict], epochs: int) -> dict:
    """One classifier's report: the mean over its seeded runs, with their spread when there are several."""
    report = dict(runs[0])
    if len(runs) > 1:
        accuracies = torch.tensor([r["accuracy"] for r in runs], dtype=torch.float64)
        report["accuracy"] = float(accuracies.mean())
        report["accuracy_std"] = float(accuracies.std())  # sample std (n - 1) over the seeds
        report["accuracy_runs"] = accuracies.tolist()
        report["per_class_accuracy"] = {
            k: None if v is None else sum(r["per_class_accuracy"][k] for r in runs) / len(runs)
            for k, v in runs[0]["per_class_accuracy"].items()
        }
        report["cpu_seconds"] = sum(r["cpu_seconds"] for r in runs)
        report["wall_seconds"] = sum(r["wall_seconds"] for r in runs)
    report.update(epochs=epochs, repeats=len(runs))
    return report


def _resolve_epochs(epochs, classifiers) -> dict[str, int]:
    if epochs is None:
        out = {c: DEFAULT_EPOCHS[c] for c in classifiers}
    elif isinstance(epochs, dict):
        out = {c: int(epochs.get(c, DEFAULT_EPOCHS[c])) for c in classifiers}
    else:
        out = {c: int(epochs) for c in classifiers}
    bad = {c: e for c, e in out.items() if e < 1}
    if bad:
        raise ConfigError(f"epochs must be at least 1, got {bad}")
    return out
