"""The DP-SGD step for a diffusers denoiser, built from Opacus' own parts.

One logical step = the sampled Gaussian mechanism the accountant assumes:
  1. Poisson sampling: every private example joins with probability q = batch_size / n, drawn
     from a generator the engine owns (on each rank for its own shard of the data);
  2. per-example denoising loss (K noise/timestep draws averaged inside the example);
  3. per-example gradients (Opacus GradSampleModule or dpdiff's fused layers; with flat clipping, kept
     factored where that is cheaper: dpdiff/privacy/factored.py), each clipped to norm C (flat or per layer);
  4. their sum + ONE draw of N(0, sigma^2 C^2) (rank 0 only when distributed), divided by the
     expected batch size, then the wrapped optimizer's step.
Physical micro-batches only split the work of 2-3 (Opacus' skip-step accumulation); they never
change what is released. An empty Poisson batch still steps (noise only): the accountant counts it.

Secrecy: amplification by subsampling and the Gaussian noise both assume the adversary cannot
predict the sampling and noise draws. They are therefore seeded from OS entropy unless
`privacy_seed` is given (tests, reproducible research); `secure_mode` draws both from the OS CSPRNG
itself (secure_random.py). `state_dict()` contains their generator
states, so a checkpoint must be kept as private as the data."""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from dataclasses import dataclass

import torch
from opacus.optimizers import get_optimizer_class
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import Dataset, default_collate

from dpdiff.adapters import unwrap_model
from dpdiff.errors import DataError, PrivacyError
from dpdiff.families.diffusion_loss import example_generator
from dpdiff.privacy.multiplicity import fold_multiplicity
from dpdiff.privacy.dp_optimizer import flat_clip_optimizer_class
from dpdiff.privacy.factored import nonfinite_rows, sq_norms, unscaled, zero_rows
from dpdiff.privacy.grad_samplers import wrap_for_per_sample_grads
from dpdiff.privacy.secure_random import secure_poisson_subset
from dpdiff.privacy.engine_checks import (  # noqa: F401  (re-exported: the engine's settings)
    CLIPPING_MODES,
    GRAD_SAMPLE_MODES,
    PRECISIONS,
    check_checkpointing,
    checked_timestep_weights,
    resolve_grad_sample_mode,
    validate,
)

FP16_LOSS_SCALE = 2.0**12  # static: a scale adapted to overflows would be chosen by the private data


@dataclass
class StepStats:
    """What one logical step did on this rank. `loss` is computed on private data WITHOUT noise:
    fine for a local progress bar, not covered by the DP guarantee, never publish it."""

    loss: float  # mean per-example denoising loss of this rank's examples; nan if it had none
    num_examples: int  # real examples this rank processed in this logical step
    num_micro_batches: int
    step: int  # logical steps taken so far (the accountant's step count)
    # share of the examples whose gradient norm exceeded C (flat clipping; nan otherwise or if none).
    # The noise is sized to C: when most gradients are far below C, most of the noise is wasted.
    clipped_fraction: float = float("nan")
    # examples whose gradient was NaN/inf (a low-precision overflow, or a non-finite input): their
    # contribution is zeroed (a function of that example alone, so the sensitivity stays C). Private like
    # `loss`: a local diagnostic, never written to a released file
    nonfinite_examples: int = 0


class DPDiffusionEngine:
    """Owns the DP wrapping of `unet` + `optimizer` and the private `dataset`; `step()` is one DP-SGD step.

    `dataset[i]` must be a dict with `latents` [C, h, w] (already VAE-scaled) and the conditioning
    tensors the model family names (`family.condition_keys`; SD: `encoder_hidden_states` [T, D]):
    a per-example latent cache. `family` (default: the one of the denoiser's class) calls the
    denoiser; `objective` (default: the family's for `noise_scheduler`) draws the noise and timesteps
    and computes each row's loss. The engine itself never asks which family it runs."""

    def __init__(
        self,
        unet: nn.Module,
        noise_scheduler,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        *,
        batch_size: int,
        physical_batch_size: int,
        noise_multiplier: float,
        max_grad_norm: float,
        noise_multiplicity: int = 1,
        timestep_weights: torch.Tensor | None = None,
        grad_sample_mode: str = "auto",
        clipping: str = "flat",
        secure_mode: bool = False,
        seed: int = 0,
        privacy_seed: int | None = None,
        distributed: bool = False,
        family=None,
        objective=None,
        precision: str = "no",
    ):
        from dpdiff.families import family_for_denoiser

        self.model = unwrap_model(unet)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.family = family if family is not None else family_for_denoiser(self.model)
        validate(self.model, self.params, optimizer, dataset, batch_size, physical_batch_size, noise_multiplier,
                 max_grad_norm, noise_multiplicity, grad_sample_mode, clipping, secure_mode, privacy_seed, distributed,
                 self.family, precision)
        self.noise_scheduler = noise_scheduler
        self.objective = objective if objective is not None else self.family.objective(noise_scheduler)
        self.condition_keys = tuple(self.family.condition_keys)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.physical_batch_size = int(physical_batch_size)
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplicity = int(noise_multiplicity)
        self.timestep_weights = checked_timestep_weights(timestep_weights, self.objective.num_train_timesteps)
        self.grad_sample_mode = resolve_grad_sample_mode(self.model, grad_sample_mode)  # what ran: recorded
        self.clipping = clipping
        self.secure_mode = secure_mode
        self.precision = precision
        self._nonfinite = 0
        self._null_shapes = None  # shapes and dtypes of the padding rows, read once
        self.distributed = distributed
        self.sample_rate = self.batch_size / len(dataset)
        self.steps_taken = 0
        self.rank, self.world_size = (
            (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        )
        self.device = self.params[0].device

        wrapped = self.model
        if distributed:
            from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

            wrapped = DPDDP(wrapped)  # broadcasts rank 0's parameters: identical start on every rank
        # "sum": every row's backward carries that row's own gradient (times a fixed loss scale), never a
        # 1/(rows in the micro-batch) factor: its rounding and overflow must not depend on its batch-mates
        self.module = wrap_for_per_sample_grads(wrapped, self.grad_sample_mode, loss_reduction="sum")
        if hasattr(self.module, "book_keeping"):  # the fused mode: factored gradients where cheaper
            self.module.book_keeping = clipping == "flat"
        # what every step re-checks, found once: a per-step module walk (train(), diffusers'
        # is_gradient_checkpointing) cost ~4% of a small UNet's step
        self._submodules = list(self.module.modules())
        self._checkpointable = [m for m in self._submodules if hasattr(m, "gradient_checkpointing")]
        self.family.train_mode(self.module)

        # this rank's shard; each of its examples is then Poisson-sampled independently with rate q
        self.shard = list(range(self.rank, len(dataset), self.world_size))
        if not self.shard:
            raise DataError(f"{len(dataset)} private examples cannot be shared over {self.world_size} processes")
        self.sampling_generator = _generator(privacy_seed, self.rank, "cpu")
        self.noise_generator = _generator(privacy_seed, self.rank + 7919, self.device)
        self.seed = int(seed)  # public: keys the per-example timestep/noise draws
        self._sampler = UniformWithReplacementSampler(
            num_samples=len(self.shard), sample_rate=self.sample_rate, generator=self.sampling_generator, steps=1
        )

        norm = self.max_grad_norm
        if clipping == "per_layer":  # equal split: sqrt(sum C_l^2) = C, so the sensitivity stays C
            norm = [self.max_grad_norm / math.sqrt(len(self.params))] * len(self.params)
        # flat: Opacus' arithmetic with O(#params) Python per step (dp_optimizer.py); per layer: Opacus' own
        optimizer_class = (flat_clip_optimizer_class(distributed) if clipping == "flat"
                           else get_optimizer_class(clipping=clipping, distributed=distributed, grad_sample_mode="hooks"))
        self.optimizer = optimizer_class(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=norm,
            # per rank; DistributedDPOptimizer divides the all-reduced sum by world_size again
            expected_batch_size=self.batch_size / self.world_size,
            loss_reduction="mean",
            generator=self.noise_generator,
            secure_mode=secure_mode,
        )

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> StepStats:
        """One logical DP-SGD step on a fresh Poisson sample (possibly empty) of this rank's shard."""
        if self.secure_mode:
            chosen = secure_poisson_subset(len(self.shard), self.sample_rate)
        else:
            chosen = next(iter(self._sampler))
        return self._logical_step([self.shard[i] for i in chosen])

    def _logical_step(self, indices: list[int]) -> StepStats:
        """Clip, accumulate, noise once and step on exactly these dataset indices.

        Only `step()` gives the Poisson sampling the accountant assumes; calling this directly is
        for tests and audits."""
        if any(m.gradient_checkpointing for m in self._checkpointable):  # may have been enabled after the engine was built
            check_checkpointing(self.model, self.grad_sample_mode)
        if not all(m.training for m in self._submodules):  # e.g. a validation grid's eval() in between
            self.family.train_mode(self.module)
        self.optimizer.zero_grad(set_to_none=True)
        chunks = [indices[i : i + self.physical_batch_size] for i in range(0, len(indices), self.physical_batch_size)]
        loss_sum, clipped = 0.0, 0
        for j, chunk in enumerate(chunks or [[]]):
            if chunk:
                loss_sum += float(self._accumulate(chunk).sum())
            else:
                self._accumulate_nothing()
            if j < len(chunks) - 1:
                self.optimizer.signal_skip_step(do_skip=True)  # clip + accumulate only; noise at the end
            self.optimizer.step()
            if chunk and self.clipping == "flat":  # the norms the optimizer clipped with: no second pass
                clipped += int((self.optimizer.last_per_sample_norms > self.max_grad_norm).sum())
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
        nonfinite, self._nonfinite = self._nonfinite, 0
        return StepStats(
            loss=loss_sum / len(indices) if indices else float("nan"),
            num_examples=len(indices),
            num_micro_batches=max(len(chunks), 1),
            step=self.steps_taken,
            clipped_fraction=clipped / len(indices) if indices and self.clipping == "flat" else float("nan"),
            nonfinite_examples=nonfinite,
        )

    def _per_example_norms(self, num_examples: int) -> torch.Tensor:
        """The flat norm of each example's (folded) gradient over every trained parameter: what clipping compares to C."""
        per_param = [sq_norms(p.grad_sample) for p in self.params if p.grad_sample is not None]
        return torch.stack(per_param, dim=1).sum(dim=1).sqrt() if per_param else torch.zeros(num_examples)

    def _accumulate(self, indices: list[int]) -> torch.Tensor:
        """Forward + backward one micro-batch; leaves one folded per-example gradient per example."""
        batch = default_collate([self.dataset[i] for i in indices])
        latents = batch["latents"].to(self.device)
        conditions = {key: batch[key].to(self.device) for key in self.condition_keys}
        padding = self.physical_batch_size - len(indices) if self.precision != "no" else 0
        if padding <= 0:
            return self.per_example_backward(latents, conditions, indices=indices)
        # Low precision: always the same micro-batch shape. The CPU/GPU kernels pick their blocking by the
        # number of rows, and in bf16/fp16 that choice moved an example's rounded gradient by ~3e-3 C with
        # the NUMBER of its batch-mates; fixed shapes leave each row a function of that row alone. The
        # padding rows are public null examples whose gradient is zeroed exactly.
        null_latents, null_conditions = self._null_examples(padding)
        latents = torch.cat([latents, null_latents])
        conditions = {key: torch.cat([value, null_conditions[key]]) for key, value in conditions.items()}
        nulls = list(range(len(self.dataset), len(self.dataset) + padding))
        losses = self.per_example_backward(latents, conditions, indices=[*indices, *nulls], num_real=len(indices))
        is_null = torch.arange(len(latents), device=self.device) >= len(indices)
        for p in self.params:
            if p.grad_sample is not None:
                p.grad_sample = zero_rows(p.grad_sample, is_null)
        return losses[: len(indices)]

    def _null_examples(self, count: int) -> tuple[torch.Tensor, dict]:
        """`count` all-zero examples shaped like the dataset's (public: they carry no private data); an attention
        mask is all ones, so no row attends over nothing (an all-masked softmax is NaN)."""
        if self._null_shapes is None:  # read one example once: a cache row may come from disk
            first = self.dataset[0]
            self._null_shapes = {key: (tuple(torch.as_tensor(first[key]).shape), torch.as_tensor(first[key]).dtype)
                                 for key in ("latents", *self.condition_keys)}
        shape, _ = self._null_shapes["latents"]
        latents = torch.zeros((count, *shape), device=self.device)
        conditions = {}
        for key in self.condition_keys:
            shape, dtype = self._null_shapes[key]
            fill = torch.ones if "mask" in key else torch.zeros
            conditions[key] = fill((count, *shape), device=self.device, dtype=dtype)
        return latents, conditions

    def per_example_backward(
        self,
        latents: torch.Tensor,
        conditions: dict | torch.Tensor,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        indices: list[int] | None = None,
        num_real: int | None = None,
    ) -> torch.Tensor:
        """Per-example losses [b] after backward; `p.grad_sample` then holds [b, ...] per parameter.

        `conditions`: the family's conditioning tensors by name ([b, ...] each; a bare tensor is the
        `encoder_hidden_states` of UNet families). `noise`/`timesteps` ([b*K, ...], rows of example i
        at i*K..i*K+K-1) default to the draws keyed by (seed, step, dataset index) of each example."""
        b, k = latents.shape[0], self.noise_multiplicity
        if isinstance(conditions, torch.Tensor):
            conditions = {"encoder_hidden_states": conditions}
        if noise is None or timesteps is None:
            keys = indices if indices is not None else range(b)
            generators = [example_generator(self.seed, self.steps_taken, i) for i in keys]
            noise, timesteps = self.objective.draw(latents, k, generators, self.timestep_weights)
        rows = latents.repeat_interleave(k, dim=0)
        row_conditions = {name: value.repeat_interleave(k, dim=0) for name, value in conditions.items()}
        module, family = self.module, self.family
        scale = FP16_LOSS_SCALE if self.precision == "fp16" else 1.0
        # the fused path stays on through backward (checkpointed blocks recompute their forward there)
        per_sample_pass = getattr(module, "per_sample_pass", contextlib.nullcontext)
        with per_sample_pass(), warnings.catch_warnings():
            # Opacus' hooks fire on module outputs because the cached inputs need no grad: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            with self._autocast():
                losses = self.objective.per_row_loss(
                    lambda noisy, t: family.predict(module, noisy, t, row_conditions), rows, noise, timesteps
                )
            # the SUM over rows, times a constant: row r's backward is scale * d(loss_r), whatever else is in
            # the micro-batch (a mean would scale it by 1/(b*K), so rounding and fp16 overflow would depend on
            # the other examples); with loss_reduction="sum" Opacus stores each row's own gradient
            (losses.sum() * scale).backward()
        self._grad_samples_to_fp32(scale)
        fold_multiplicity(self.params, b, k)
        self._zero_nonfinite(b, b if num_real is None else num_real)
        return losses.detach().view(b, k).mean(dim=1)

    def _autocast(self):
        """Forward (and so backward) in bf16/fp16 under autocast; weights, per-example gradients, clipping,
        noise and the step stay fp32 (master weights), so the noise is never rounded away."""
        if self.precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _grad_samples_to_fp32(self, scale: float) -> None:
        """Low precision: per-sample gradients back to fp32 and unscaled, before K-folding and clipping."""
        if self.precision != "no":
            for p in self.params:
                if p.grad_sample is not None:
                    p.grad_sample = unscaled(p.grad_sample, scale)

    def _zero_nonfinite(self, num_examples: int, num_real: int) -> None:
        """An example whose gradient is NaN/inf (a low-precision overflow, or a non-finite input in any
        precision) contributes zeros instead: clipping cannot bound NaN, and one NaN would make the whole
        release NaN. The decision looks at that example's own gradient only (its backward carried no
        factor that depends on the other examples: `per_example_backward`)."""
        grads = [p for p in self.params if p.grad_sample is not None]
        bad = torch.zeros(num_examples, dtype=torch.bool, device=self.device)
        for p in grads:
            bad |= nonfinite_rows(p.grad_sample)
        if bool(bad.any()):
            for p in grads:
                p.grad_sample = zero_rows(p.grad_sample, bad)
            self._nonfinite += int(bad[:num_real].sum())  # the padding rows are not examples

    def _accumulate_nothing(self) -> None:
        """An empty batch: Opacus cannot run on zero rows, so run one all-zero dummy example and zero
        its per-sample gradient exactly. The step then releases noise only (and, distributed, this
        rank still joins the all-reduce so the others do not hang)."""
        latents, conditions = self._null_examples(1)
        self.per_example_backward(latents, conditions, indices=[len(self.dataset)], num_real=0)
        for p in self.params:
            p.grad_sample = torch.zeros_like(p.grad_sample)

    # ---- resume ---------------------------------------------------------------------------------

    def _privacy_config(self) -> dict:
        return {
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplicity": self.noise_multiplicity,
            "clipping": self.clipping,
            "world_size": self.world_size,
        }

    def _local_state(self) -> dict:
        return {
            "sampling_generator": self.sampling_generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
        }

    def state_dict(self) -> dict:
        """Step count, privacy settings and every rank's generator states (distributed: a collective,
        call it on all ranks). Contains the secret sampling/noise states: keep it private."""
        ranks = [self._local_state()]
        if self.distributed:
            ranks = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, self._local_state())
        return {"steps_taken": self.steps_taken, "seed": self.seed, "config": self._privacy_config(), "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. Refuses other privacy settings: the accountant
        composes one (q, sigma) over all steps, a silent change would misstate epsilon."""
        saved, current = state["config"], self._privacy_config()
        changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if changed:
            raise PrivacyError(
                f"cannot resume with different privacy settings {changed} (saved, now); resume with the saved "
                "settings or start a new run with its own accounting"
            )
        mine = state["ranks"][self.rank]
        self.sampling_generator.set_state(mine["sampling_generator"].cpu())
        self.noise_generator.set_state(mine["noise_generator"].cpu())
        self.seed = int(state["seed"])
        self.steps_taken = int(state["steps_taken"])


def _generator(privacy_seed: int | None, offset: int, device) -> torch.Generator:
    """A generator for a secret draw: OS entropy unless a seed was given for reproducibility."""
    generator = torch.Generator(device=device)
    seed = secrets.randbits(63) if privacy_seed is None else privacy_seed * 1_000_003 + offset
    return generator.manual_seed(seed)
