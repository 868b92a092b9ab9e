"""The per-example denoising loss (model knowledge: `dpdiff.families.diffusion_loss`) and the engine's
noise-multiplicity fold (`dpdiff.privacy.multiplicity`), under the names they had here."""

from dpdiff.families.diffusion_loss import (  # noqa: F401  (re-exported)
    PREDICTION_TYPES,
    TIMESTEP_BIAS_STRATEGIES,
    denoising_loss,
    draw_diffusion_inputs,
    example_generator,
    per_row_loss,
    timestep_weights,
)
from dpdiff.privacy.multiplicity import fold_multiplicity  # noqa: F401  (re-exported)
