"""Build and load Stable-Diffusion-format pipelines (hub id or local folder; the built-in preset)."""

from dpdiff.pipelines.loading import PRESET_DIR, PRESET_NAME, load_pipeline, resolve_model_path
from dpdiff.pipelines.preset import build_tiny_pipeline, build_tiny_unet

__all__ = [
    "PRESET_DIR",
    "PRESET_NAME",
    "build_tiny_pipeline",
    "build_tiny_unet",
    "load_pipeline",
    "resolve_model_path",
]
