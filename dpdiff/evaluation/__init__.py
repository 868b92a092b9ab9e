"""Scoring synthetic images: Fréchet distance on pretrained features and downstream classifiers
(train on synthetic, test on real), the protocol of the DP image-generation papers."""

from dpdiff.evaluation.classifiers import CLASSIFIERS, DEFAULT_EPOCHS, build_classifier, evaluate_downstream
from dpdiff.evaluation.frechet import FD_NAME, compute_fd, feature_statistics, frechet_distance, inception_fid
from dpdiff.evaluation.synthetic import LabelledImages, load_synthetic, map_labels

__all__ = [
    "CLASSIFIERS",
    "DEFAULT_EPOCHS",
    "FD_NAME",
    "LabelledImages",
    "build_classifier",
    "compute_fd",
    "evaluate_downstream",
    "feature_statistics",
    "frechet_distance",
    "inception_fid",
    "load_synthetic",
    "map_labels",
]
