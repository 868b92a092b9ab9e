"""Shared fixtures: a tiny random-weight SD pipeline saved to disk (fast, independent of the
packaged preset), and quiet, offline, single-threaded defaults."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

PUBLIC_PROMPTS = ["a photo of a digit 0", "a photo of a bear", "a photo of a giraffe"]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A random-init preset-shaped pipeline written with `save_pretrained` (safetensors)."""
    from dpdiff.pipelines.preset import build_tiny_pipeline

    pipe = build_tiny_pipeline(PUBLIC_PROMPTS, seed=0)
    pipe.vae.register_to_config(scaling_factor=1.0)
    path = tmp_path_factory.mktemp("pipelines") / "tiny-sd"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
