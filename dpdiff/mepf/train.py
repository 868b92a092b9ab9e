"""Train the generator to match the released embedding. Post-processing only: no privacy cost.

Loss per step, with per-class moments of phi over the generated batch (balanced labels):
    sum_c w_c * ( ||m1_c - g1_c||^2 + ||m2_c - g2_c||^2 )
where m* are the released (noisy) means, w_c the noisy class proportions, and g* a moving average
of the generated moments, g <- beta * g.detach() + (1 - beta) * batch moments (the DP-MEPF paper's
trick: a small batch's moments are too noisy to match directly).

Checkpoint selection: every `eval_every` steps the generator (eval mode, fixed noise) is scored
against the noisy VALIDATION embedding when the release has one, else against the training
embedding (also public). The score is the same distance with each class's finite-sample term
removed (||mean of n samples - m||^2 overstates ||E phi - m||^2 by tr(Cov phi) / n, which at a few
dozen samples is larger than the distance itself and rewards a generator for LESS variety); the
per-class terms are kept in the result. The best one is written to `<output_dir>/generator`; the
latest state (generator, Adam, moving averages) to `<output_dir>/checkpoint` for resuming.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from dpdiff.errors import ConfigError, IntegrityError
from dpdiff.features import FeatureExtractor
from dpdiff.io import atomic_dir, write_json
from dpdiff.mepf.embedding import embed, embedding_dim
from dpdiff.mepf.generator import GENERATOR_DIR, ConditionalGenerator, save_generator
from dpdiff.mepf.release import EmbeddingTarget, ReleasedEmbedding

CHECKPOINT_DIR = "checkpoint"
LR_SCHEDULES = ("constant", "cosine", "step")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 100
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # "cosine": from learning_rate down to 0 at `steps`; "step": see lr_decay_*
    lr_decay_at: float = 0.7  # "step": the fraction of `steps` after which the rate is multiplied by lr_decay_factor
    lr_decay_factor: float = 0.2
    moving_average: float = 0.9  # beta of the generated-moment average; 0 = match each batch
    eval_every: int = 200
    eval_samples_per_class: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ConfigError(f"generator_steps, batch_size and eval_every must be >= 1: {self}")
        if self.eval_samples_per_class < 2:
            raise ConfigError(f"eval_samples_per_class must be >= 2 (the score removes each class's sample variance), got {self.eval_samples_per_class}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not (0.0 < self.lr_decay_at < 1.0) or not (0.0 < self.lr_decay_factor <= 1.0):
            raise ConfigError(f"lr_decay_at must be in (0, 1) and lr_decay_factor in (0, 1], got {self.lr_decay_at} and {self.lr_decay_factor}")
        if not (0.0 <= self.moving_average < 1.0):
            raise ConfigError(f"moving_average must be in [0, 1), got {self.moving_average}")

    def learning_rate_at(self, step: int) -> float:
        """The rate of step `step` (0-based): a function of the absolute step, so a resumed run continues the
        schedule where it stopped (the matching score stalls at a constant rate; a decay keeps lowering it)."""
        if self.lr_schedule == "cosine":
            return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        if self.lr_schedule == "step" and step >= round(self.lr_decay_at * self.steps):
            return self.learning_rate * self.lr_decay_factor
        return self.learning_rate


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_scores: list[float] = field(default_factory=list)
    eval_class_scores: list[list[float]] = field(default_factory=list)  # per class, at each of eval_steps
    best_step: int = 0
    best_score: float = math.inf
    selected_by: str = "train"


def class_moments(phi: Tensor, labels: Tensor, num_classes: int, moments: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-class mean of phi (and phi**2) over a batch; also which classes were present."""
    counts = torch.zeros(num_classes, dtype=phi.dtype, device=phi.device).index_add_(0, labels, torch.ones_like(labels, dtype=phi.dtype))
    denom = counts.clamp(min=1.0).unsqueeze(1)
    mean1 = torch.zeros(num_classes, phi.shape[1], dtype=phi.dtype, device=phi.device).index_add(0, labels, phi) / denom
    mean2 = None
    if moments == 2:
        mean2 = torch.zeros_like(mean1).index_add(0, labels, phi * phi) / denom
    return mean1, mean2, counts > 0


def class_distances(target: EmbeddingTarget, mean1: Tensor, mean2: Tensor | None) -> Tensor:
    """||m1_c - g1_c||^2 [+ ||m2_c - g2_c||^2] for each class c: [K]."""
    per_class = (target.mean1.to(mean1) - mean1).pow(2).sum(dim=1)
    if target.mean2 is not None and mean2 is not None:
        per_class = per_class + (target.mean2.to(mean2) - mean2).pow(2).sum(dim=1)
    return per_class


def matching_distance(target: EmbeddingTarget, mean1: Tensor, mean2: Tensor | None) -> Tensor:
    """sum_c w_c (||m1_c - g1_c||^2 [+ ||m2_c - g2_c||^2])."""
    per_class = class_distances(target, mean1, mean2)
    return (target.class_weights.to(per_class) * per_class).sum()


def sample_variance_terms(phi: Tensor, samples_per_class: int, moments: int) -> Tensor:
    """tr(Cov phi) / n [+ tr(Cov phi^2) / n] per class, from class-sorted rows (n each): the expected excess
    of a class's squared distance measured on n samples over its distance at infinitely many."""
    k = phi.shape[0] // samples_per_class
    rows = phi.view(k, samples_per_class, -1)
    terms = rows.var(dim=1, correction=1).sum(dim=1) / samples_per_class
    if moments == 2:
        terms = terms + (rows * rows).var(dim=1, correction=1).sum(dim=1) / samples_per_class
    return terms


def selection_target(release: ReleasedEmbedding) -> tuple[str, EmbeddingTarget]:
    """What generators are scored against: the held-out (validation) embedding when released, else the training one."""
    part = "validation" if release.has_validation else "train"
    return part, release.target(part)


def balanced_labels(batch_size: int, num_classes: int, generator: torch.Generator) -> Tensor:
    labels = torch.arange(batch_size) % num_classes
    return labels[torch.randperm(batch_size, generator=generator)]


@torch.no_grad()
def score_generator(model: ConditionalGenerator, extractor: FeatureExtractor, release: ReleasedEmbedding, target: EmbeddingTarget,
                    samples_per_class: int, seed: int = 1234) -> tuple[float, list[float]]:
    """A fixed-noise sample's distance to a released target (eval mode), each class's finite-sample term
    removed: (class-weighted sum, per-class distances). Unbiased for the generator's own distance."""
    was_training = model.training
    model.eval()
    k = model.config.num_classes
    device = next(model.parameters()).device
    labels = torch.arange(k).repeat_interleave(samples_per_class)
    images = model.sample(labels, generator=torch.Generator().manual_seed(seed))
    labels = labels.to(device)
    phi = torch.cat([embed(extractor, chunk, release.config) for chunk in images.split(256)])
    mean1, mean2, _ = class_moments(phi, labels, k, release.config.moments)
    model.train(was_training)
    per_class = class_distances(target, mean1, mean2) - sample_variance_terms(phi, samples_per_class, release.config.moments)
    return float((target.class_weights.to(per_class) * per_class).sum()), per_class.tolist()


def train_generator(
    release: ReleasedEmbedding,
    extractor: FeatureExtractor,
    model: ConditionalGenerator,
    config: TrainConfig,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fit `model` to `release`; writes the best generator and the latest checkpoint when `output_dir`."""
    k = model.config.num_classes
    if k != release.target().mean1.shape[0]:
        raise ConfigError(f"generator has {k} classes but the release has {release.target().mean1.shape[0]} rows")
    dim, got = release.target().mean1.shape[1], embedding_dim(extractor, release.config, release.resolution, release.channels)
    if got != dim:  # another extractor, layers or statistics than the release's: the loss would compare unrelated features
        raise ConfigError(f"the release's embedding has {dim} features per class but {extractor.name} with layers "
                          f"{' '.join(extractor.layer_names)} gives {got} under its config: build the extractor from the release's "
                          f"own config (build_extractor(release.config)); a release is only matched with the features it was made from")
    if config.batch_size < k:
        raise ConfigError(f"batch_size ({config.batch_size}) must be at least the number of classes ({k}) so every class is matched each step")
    torch.manual_seed(config.seed)
    rng = torch.Generator().manual_seed(config.seed)
    target = release.target("train")
    selected_by, selection = selection_target(release)
    result = TrainResult(selected_by=selected_by)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, betas=(0.5, 0.999))
    averages: dict[str, Tensor] = {}
    start = 0
    if resume and output_dir is not None and (Path(output_dir) / CHECKPOINT_DIR).is_dir():
        start, averages = _load_checkpoint(Path(output_dir) / CHECKPOINT_DIR, model, optimizer, result, rng)
    model.train()
    device = next(model.parameters()).device
    beta = config.moving_average
    bar = tqdm(range(start, config.steps), desc="MEPF generator", disable=not progress, initial=start, total=config.steps)
    for step in bar:
        labels = balanced_labels(config.batch_size, k, rng).to(device)
        z = torch.randn(config.batch_size, model.config.z_dim, generator=rng).to(device)
        phi = embed(extractor, model(z, labels), release.config)
        mean1, mean2, present = class_moments(phi, labels, k, release.config.moments)
        for name, value in (("mean1", mean1), ("mean2", mean2)):
            if value is None:
                continue
            old = averages.get(name)
            mix = value if old is None else torch.where(present.unsqueeze(1), beta * old + (1 - beta) * value, old)
            averages[name] = mix
        loss = matching_distance(target, averages["mean1"], averages.get("mean2"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # this run's schedule, also after a resume (not the checkpoint's rate)
            group["lr"] = config.learning_rate_at(step)
        optimizer.step()
        averages = {n: v.detach() for n, v in averages.items()}
        result.losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{result.losses[-1]:.4g}")
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            score, per_class = score_generator(model, extractor, release, selection, config.eval_samples_per_class)
            result.eval_steps.append(done)
            result.eval_scores.append(score)
            result.eval_class_scores.append(per_class)
            if score < result.best_score:
                result.best_score, result.best_step = score, done
                if output_dir is not None:
                    save_generator(model, Path(output_dir) / GENERATOR_DIR)
            if output_dir is not None:
                _save_checkpoint(Path(output_dir) / CHECKPOINT_DIR, done, model, optimizer, averages, result, rng)
    return result


def _save_checkpoint(path: Path, step: int, model, optimizer, averages: dict, result: TrainResult, rng: torch.Generator) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"average.{k}": v.cpu().contiguous() for k, v in averages.items()})
    tensors["rng_state"] = rng.get_state()
    state = optimizer.state_dict()
    for idx, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer.{idx}.{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"step": step, "result": asdict(result), "param_groups": state["param_groups"]}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        write_json(tmp / "trainer_state.json", meta)


def _load_checkpoint(path: Path, model, optimizer, result: TrainResult, rng: torch.Generator) -> tuple[int, dict]:
    try:
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IntegrityError(f"checkpoint at {path} is unreadable: {e}; delete it to start over") from e
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, slot = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[slot] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    rng.set_state(tensors["rng_state"])
    for name, value in meta["result"].items():
        setattr(result, name, value)
    if result.eval_scores and "eval_class_scores" not in meta["result"]:
        # written before selection removed the finite-sample term: its scores are on another scale, so the next
        # evaluation is not compared with them (its generator replaces the old best)
        result.best_score = math.inf
        result.eval_class_scores = [[] for _ in result.eval_scores]
    averages = {k[8:]: v for k, v in tensors.items() if k.startswith("average.")}
    return int(meta["step"]), averages
