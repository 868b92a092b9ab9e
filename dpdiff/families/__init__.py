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

# each module registers its family; SD first: it answers for a bare UNet2DConditionModel
from dpdiff.families import stable_diffusion  # noqa: E402, F401, I001
from dpdiff.families import sdxl, pixart, dit, sd3, flux, sana  # noqa: E402, F401

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
