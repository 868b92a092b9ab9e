"""An example's clipped contribution is a function of that example alone, in every precision.

Read as an adversary would (issue 37): neighbouring batches under the same secret seeds, the released sum
taken from the gradient the wrapped optimizer receives, times the expected batch size. Before the fix the
low-precision backward ran on `losses.mean()`, so each example's gradient was carried in bf16/fp16 scaled
by 1/(rows in its micro-batch): its rounding and its fp16 overflow decision depended on its batch-mates
(1.44 C of sensitivity in fp16, 0.02-0.045 C shifts in bf16)."""

from __future__ import annotations

import pytest
import torch

from dpdiff.adapters import prepare_trainable
from dpdiff.families import family_for_pipeline
from dpdiff.pipelines.tiny_families import build_tiny_family_pipeline
from dpdiff.privacy.engine import DPDiffusionEngine
from dpdiff.training.latent_cache import LatentCache
from test_engine import make_engine

ROUNDING = 1e-4  # of C: the batched kernels' own rounding (fp32: ~2e-6 C)
NORMAL, LARGE, NAN, OVERFLOW = 0, 1, 2, 3  # dataset indices of the roles below; 4.. are ordinary examples


class Recorder(torch.optim.SGD):
    """Keeps the gradient Opacus hands over ((clipped sum + noise) / expected batch) and does not move."""

    received: torch.Tensor | None = None

    def step(self, closure=None):
        self.received = torch.cat([p.grad.flatten() for group in self.param_groups for p in group["params"]]).clone()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_roles(latents: torch.Tensor, precision: str) -> None:
    """Example 1: large enough to be clipped; 2: NaN latents; 3: overflows the fp16 backward (fp16 only)."""
    latents[LARGE] *= 30.0
    latents[NAN] = float("nan")
    if precision == "fp16":
        latents[OVERFLOW] = 1e6


def unet_engine(precision, mode, clipping, k):
    engine = make_engine("lora", n=8, lora_targets=["to_q", "to_k", "to_v", "to_out.0"], grad_sample_mode=mode,
                         clipping=clipping, precision=precision, noise_multiplicity=k, batch_size=8,
                         physical_batch_size=8, max_grad_norm=0.02, noise_multiplier=0.0)
    make_roles(engine.dataset.latents, precision)
    return engine


def dit_engine(precision, k, build="sd3"):
    pipe = build_tiny_family_pipeline(build)
    family = family_for_pipeline(pipe)
    denoiser = family.denoiser(pipe)
    family.train_mode(denoiser)
    prepare_trainable(denoiser, "lora", rank=2, family=family)
    with torch.no_grad():  # LoRA B starts at 0 (A's gradient would be 0): move it so both factors count
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    prompts = [f"a photo of thing number {i}" for i in range(8)]
    conditions = {key: value[:8] for key, value in family.encode_conditions(pipe, prompts + [""], 32).items()}
    latents = torch.randn(8, family.latent_channels(denoiser), 8, 8, generator=torch.Generator().manual_seed(3))
    make_roles(latents, precision)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    return DPDiffusionEngine(denoiser, family.training_scheduler(pipe), Recorder(params, lr=0.0),
                             LatentCache.per_example(latents, conditions), family=family, batch_size=8,
                             physical_batch_size=8, noise_multiplier=0.0, max_grad_norm=0.02, noise_multiplicity=k,
                             privacy_seed=0, precision=precision)


def recording(engine) -> DPDiffusionEngine:
    if not isinstance(engine.optimizer.original_optimizer, Recorder):
        engine.optimizer.original_optimizer.__class__ = Recorder  # same state, its step only records
    return engine


def released(engine, indices) -> tuple[torch.Tensor, int]:
    """The clipped sum (sigma = 0) of `indices` in ONE micro-batch (physical batch 8) at step 0, and how many
    were zeroed."""
    assert len(indices) <= engine.physical_batch_size
    engine.steps_taken = 0  # the same public noise/timestep draws for every batch
    stats = engine._logical_step(list(indices))
    return engine.optimizer.original_optimizer.received * engine.batch_size, stats.nonfinite_examples


def check_isolation(engine, precision):
    recording(engine)
    c = engine.max_grad_norm
    hostile = [NAN, OVERFLOW] if precision == "fp16" else [NAN]
    batchmates = [[5], [5, 6, 7], [5, LARGE], [5, *hostile]]
    for e in (NORMAL, 4, LARGE):
        alone, zeroed = released(engine, [e])
        assert zeroed == 0 and alone.norm() > 0.1 * c
        assert alone.norm() <= c * (1 + ROUNDING)
        for others in batchmates:
            without, zeroed_without = released(engine, others)
            beside, zeroed_beside = released(engine, [e, *others])
            # (a) e's contribution (and the others' unchanged ones) beside other examples is e's contribution alone
            shift = float((beside - without - alone).norm())
            assert shift <= ROUNDING * c, (e, others, shift / c)
            # the zeroing decision is the same whoever is in the batch
            assert zeroed_beside == zeroed_without == sum(i in hostile for i in others)
            # (b) the neighbouring release moves by at most C
            assert float((beside - without).norm()) <= c * (1 + ROUNDING)
    for x in hostile:  # a non-finite or overflowing neighbour changes nothing at all, and the release stays finite
        with_x, zeroed = released(engine, [NORMAL, 4, x])
        assert zeroed == 1 and torch.isfinite(with_x).all()
        assert float((with_x - released(engine, [NORMAL, 4])[0]).norm()) <= ROUNDING * c


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
@pytest.mark.parametrize("mode, clipping", [("fused", "flat"), ("hooks", "flat"), ("hooks", "per_layer")])
@pytest.mark.parametrize("k", [1, 2])
def test_unet_contribution_depends_on_the_example_alone(precision, mode, clipping, k):
    check_isolation(unet_engine(precision, mode, clipping, k), precision)


@pytest.mark.parametrize("build, precision, k", [("sd3", "bf16", 1), ("sd3", "bf16", 2), ("sd3", "fp16", 1),
                                                 ("sd3", "fp16", 2), ("pixart_sigma", "bf16", 1), ("flux", "bf16", 1),
                                                 ("sana", "bf16", 1), ("sdxl", "bf16", 1)])
def test_transformer_contribution_depends_on_the_example_alone(build, precision, k):
    """SD3's joint attention, PixArt's and Sana's masked cross-attention (the padding rows carry an all-ones
    mask), Flux's packed latents and ids, SDXL's added conditions."""
    check_isolation(dit_engine(precision, k, build), precision)


def test_fp32_with_a_nan_example_releases_a_finite_sum_with_noise():
    engine = recording(unet_engine("no", "fused", "flat", 1))
    engine.noise_multiplier = engine.optimizer.noise_multiplier = 1.0
    total, zeroed = released(engine, [NORMAL, NAN, 4])
    assert zeroed == 1 and torch.isfinite(total).all()
    assert total.std() > 0.5 * engine.max_grad_norm  # the noise is there (sigma C per coordinate)
