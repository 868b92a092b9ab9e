"""Several generators on one release, the best one kept. Post-processing of the release: no privacy cost.

On a fixed release the generator's own training varies far more than the release's noise does at a
moderate epsilon: on Fashion-MNIST at epsilon = 10 one seed loses a class (a mode the moment matching
does not leave: sneakers drawn as flat sandals) that another seed learns. Each candidate trains from
its own seed (`seed`, `seed + 1`, ...) into `<output_dir>/candidates/seed<k>/`, with its own checkpoint
so `--resume` continues each one. The candidates' selected generators are then scored on a fresh,
larger sample with the finite-sample-corrected distance of checkpoint selection (train.score_generator),
against the validation embedding when the release has one, and the best is copied to
`<output_dir>/generator`, where `dpdiff sample` finds it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from dpdiff.errors import ConfigError
from dpdiff.features import FeatureExtractor
from dpdiff.io import atomic_dir
from dpdiff.mepf.generator import GENERATOR_DIR, ConditionalGenerator, load_generator
from dpdiff.mepf.release import ReleasedEmbedding
from dpdiff.mepf.train import TrainConfig, TrainResult, score_generator, selection_target, train_generator

CANDIDATES_DIR = "candidates"
SELECTION_SEED = 4321  # not the checkpoint scores' noise (1234): the final choice is scored on samples it was not chosen on


@dataclass
class Candidate:
    seed: int
    folder: str
    score: float  # class-weighted, finite-sample-corrected distance on the selection sample
    class_scores: list[float]
    result: TrainResult


def train_best_of(
    release: ReleasedEmbedding,
    extractor: FeatureExtractor,
    make_model: Callable[[], ConditionalGenerator],
    config: TrainConfig,
    num_generators: int,
    output_dir: str | os.PathLike,
    select_samples_per_class: int = 200,
    resume: bool = False,
    progress: bool = True,
) -> tuple[Candidate, list[Candidate]]:
    """Train `num_generators` generators (seeds config.seed, config.seed + 1, ...) and keep the best."""
    if num_generators < 1:
        raise ConfigError(f"num_generators must be >= 1, got {num_generators}")
    if select_samples_per_class < 2:
        raise ConfigError(f"select_samples_per_class must be >= 2 (the score removes each class's sample variance), got {select_samples_per_class}")
    _, target = selection_target(release)
    candidates = []
    for index in range(num_generators):
        seed = config.seed + index
        folder = Path(output_dir) / CANDIDATES_DIR / f"seed{seed}"
        torch.manual_seed(seed)  # the candidate's initialisation depends on its seed only
        model = make_model()
        result = train_generator(release, extractor, model, replace(config, seed=seed), folder, resume=resume, progress=progress)
        chosen = load_generator(folder / GENERATOR_DIR).to(next(model.parameters()).device)
        score, class_scores = score_generator(chosen, extractor, release, target, select_samples_per_class, seed=SELECTION_SEED)
        candidates.append(Candidate(seed, str(folder), score, class_scores, result))
    best = min(candidates, key=lambda c: c.score)
    with atomic_dir(Path(output_dir) / GENERATOR_DIR) as tmp:
        for item in (Path(best.folder) / GENERATOR_DIR).iterdir():
            shutil.copy2(item, tmp / item.name)
    return best, candidates
