"""DP-MEPF (Harder et al.): release noisy mean embeddings of pretrained perceptual features once,
then train a generator to match them at no further privacy cost.

    embedding.py    phi(x): per-example feature vector of norm <= C, and its exact sums
    calibration.py  analytic Gaussian mechanism: sigma for all releases together
    release.py      the one private step: noisy sums + noisy counts, privacy record, save/load
    generator.py    ResNet-style conditional generator, save/load (safetensors)
    train.py        moment matching with a moving average, checkpoint selection
    restarts.py     several generators on one release, the best kept (no privacy cost)
    sample.py       sample_mepf: images for `dpdiff sample`
    cli.py          `dpdiff mepf` / recipes/train_mepf.py
"""

from dpdiff.mepf.calibration import GaussianRelease, epsilon_for_releases, noise_multiplier_for_releases
from dpdiff.mepf.embedding import EmbeddingConfig, embed, feature_vector
from dpdiff.mepf.generator import ConditionalGenerator, GeneratorConfig, load_generator, save_generator
from dpdiff.mepf.release import ReleasedEmbedding, load_release, release_embedding, save_release
from dpdiff.mepf.sample import sample_mepf
from dpdiff.mepf.train import TrainConfig, train_generator

__all__ = [
    "ConditionalGenerator", "EmbeddingConfig", "GaussianRelease", "GeneratorConfig", "ReleasedEmbedding",
    "TrainConfig", "embed", "epsilon_for_releases", "feature_vector", "load_generator", "load_release",
    "noise_multiplier_for_releases", "release_embedding", "sample_mepf", "save_generator", "save_release",
    "train_generator",
]
