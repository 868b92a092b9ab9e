"""Model families: what differs between SD-1.x/2.x, SDXL, PixArt, SD3, Flux, Sana and DiT lives in one
module each, behind a registry keyed by the pipeline class (see `base.ModelFamily`)."""

from dpdiff.families.registry import (
    families,
    family_for_denoiser,
    family_for_folder,
    family_for_pipeline,
    family_for_pipeline_class,
    family_named,
    register_family,
    supported_pipelines,
)
from dpdiff.families import sdxl, stable_diffusion  # noqa: F401, E402  (each module registers its family)

__all__ = [
    "families",
    "family_for_denoiser",
    "family_for_folder",
    "family_for_pipeline",
    "family_for_pipeline_class",
    "family_named",
    "register_family",
    "supported_pipelines",
]
