"""Peak device memory of a DP fine-tuning run, planned from the model configs before anything loads.

The pipeline's models are built on the meta device from their configs (no weights read, seconds even
for Flux), the trainable set is chosen as the run will choose it, and the peak of the training phase is

    weights (frozen in the run's precision, trained fp32) + trained state (Adam's two moments, EMA; fp32)
    + the runtime (CUDA context / the CPU process itself) + per-example gradients (one fp32 copy of the trained
    parameters per row of the physical batch; factored layers as their two factors), alive from backward to the step
    + the larger of: the activations kept for backward (activation_trace.py, times a per-family factor measured in
    benchmarks/real_shapes.py), and the optimizer step's fp32 buffers (the clipped sum, noised in place; Adam's work).

A run that cannot fit is refused with one error naming the flags that shrink it; `--dry_run` prints the
plan and stops. The VAE and text encoders are on the device only while the latent cache is built (and for
sample grids); on a CPU they stay in the same memory and are added."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dpdiff.adapters import prepare_trainable
from dpdiff.errors import ConfigError
from dpdiff.pipelines.loading import resolve_model_path, weight_dtype
from dpdiff.privacy.engine_checks import resolve_grad_sample_mode
from dpdiff.privacy.factored import worth_factoring
from dpdiff.privacy.grad_samplers import FUSED_MODE, fused_layers
from dpdiff.training.activation_trace import text_length, trace_activations

GIB = 2**30
# measured activation memory / traced saved bytes, per family. benchmarks/real_shapes.py on a CPU (docs/benchmarks.md
# "## Real shapes": SD-1.5 and PixArt-alpha, LoRA and attention, with and without checkpointing) put the whole plan
# within 3% of the measured peaks with the trace taken as it is, so no family needs a correction yet
ACTIVATION_FACTOR = {"default": 1.0}
RUNTIME_BYTES = {"cpu": int(0.6 * GIB), "cuda": int(0.6 * GIB)}  # torch + libraries in RSS / the CUDA context
# fp32 copies of the trained parameters the optimizer step holds at once besides Adam's moments: the clipped sum, into
# which the noise is drawn tensor by tensor (it becomes the gradient; the foreach Adam step's temporaries overlap it).
# Measured: SD-1.5 `attention` (267M trained, checkpointing) peaked at 7.07 GiB while the noise was a second flat copy
# (2 copies planned 7.08), and at 6.30 GiB with the noise drawn in place (1 copy plans 6.1)
STEP_COPIES = 1
HEADROOM = 0.9  # plan to use at most this share of the free memory (fragmentation, allocator caches)


@dataclass
class MemoryPlan:
    family: str
    method: str
    precision: str
    rows: int  # physical batch x noise multiplicity: what one forward sees
    latent: tuple[int, int]
    gradient_checkpointing: bool
    total_params: int
    trained_params: int
    weight_bytes: int  # the denoiser: frozen in the precision's dtype, trained fp32
    state_bytes: int  # trained: Adam's moments (+ EMA), kept between steps
    step_bytes: int  # trained: the optimizer step's buffer (the clipped sum, noised in place)
    per_example_bytes: int  # per-example gradients of one physical batch
    activation_bytes: int
    runtime_bytes: int
    encoder_bytes: int  # VAE + text encoders in the precision's dtype
    encoders_resident: bool  # True on a CPU: they share the memory the training uses
    device: str
    available_bytes: int | None

    @property
    def peak_bytes(self) -> int:
        training = (self.weight_bytes + self.state_bytes + self.runtime_bytes + self.per_example_bytes
                    + max(self.activation_bytes, self.step_bytes))  # backward's activations are freed before the step
        return training + (self.encoder_bytes if self.encoders_resident else 0)

    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes <= HEADROOM * self.available_bytes

    def describe(self) -> str:
        g = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"  # noqa: E731
        lines = [
            f"memory plan: {self.family} {self.method}, precision {self.precision}, {self.rows} row(s) per forward, "
            f"latent {self.latent[0]}x{self.latent[1]}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}",
            f"  denoiser weights     {g(self.weight_bytes)}  ({self.total_params / 1e6:.1f}M parameters, "
            f"{self.trained_params / 1e6:.2f}M trained in fp32)",
            f"  trained state        {g(self.state_bytes)}  (Adam moments, EMA)",
            f"  per-example grads    {g(self.per_example_bytes)}",
            f"  activations          {g(self.activation_bytes)}  (backward)",
            f"  optimizer step       {g(self.step_bytes)}  (the clipped sum, noised in place; after backward)",
            f"  runtime              {g(self.runtime_bytes)}",
            f"  VAE + text encoders  {g(self.encoder_bytes)}  ({'counted: same memory' if self.encoders_resident else 'off the device while training'})",
            f"  peak                 {g(self.peak_bytes)}  on {self.device}"
            + (f" with {g(self.available_bytes)} free" if self.available_bytes is not None else ""),
        ]
        return "\n".join(lines)

    def check(self) -> None:
        """One error, before any work, naming the flags that make the run fit."""
        if self.fits():
            return
        advice = []
        if self.rows > 1:
            advice.append("a smaller --physical_batch_size (the guarantee does not change)")
        if not self.gradient_checkpointing:
            advice.append("--gradient_checkpointing")
        if self.precision == "no":
            advice.append("--mixed_precision bf16 (frozen weights in bf16)")
        if not advice:
            advice.append("a smaller --resolution, --method lora, or a device with more memory")
        raise ConfigError(
            f"this run needs about {self.peak_bytes / GIB:.1f} GiB on {self.device} but {self.available_bytes / GIB:.1f} GiB "
            f"is free ({HEADROOM:.0%} of it is planned): try {'; '.join(advice)}. `--dry_run` prints the plan.\n"
            + self.describe())


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the device: CUDA's free memory, or the host's MemAvailable for a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def meta_components(name_or_path: str) -> tuple[str, dict[str, torch.nn.Module], dict]:
    """(pipeline class name, {component: model on the meta device}, {tokenizer max lengths}) from configs only."""
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    path = resolve_model_path(name_or_path)
    index = DiffusionPipeline.load_config(path)
    models, lengths = {}, {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2 or spec[1] is None:
            continue
        library, class_name = spec
        if library == "diffusers" and hasattr(getattr(diffusers, class_name, None), "from_config"):
            cls = getattr(diffusers, class_name)
            if not issubclass(cls, torch.nn.Module):
                continue
            with torch.device("meta"):
                models[name] = cls.from_config(cls.load_config(path, subfolder=name))
        elif library == "transformers" and "Tokenizer" not in class_name:
            config = transformers.AutoConfig.from_pretrained(path, subfolder=name)
            with torch.device("meta"):
                models[name] = getattr(transformers, class_name)(config)
        elif library == "transformers":
            lengths[name] = _tokenizer_max_length(path, name)
    return str(index.get("_class_name")), models, lengths


def _tokenizer_max_length(path: str, name: str) -> int | None:
    file = Path(path) / name / "tokenizer_config.json"
    if not file.is_file():
        return None
    value = json.loads(file.read_text()).get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and value < 1e6 else None


def plan_memory(name_or_path: str, *, method: str, precision: str, physical_batch_size: int, resolution: int | None = None,
                gradient_checkpointing: bool = False, noise_multiplicity: int = 1, rank: int = 8, lora_alpha=None,
                lora_target_modules=None, attention_start_index: int = 0, train_condition_embedder: bool = False,
                ema: bool = True, grad_sample_mode: str = "auto", clipping: str = "flat", device: str | torch.device = "cpu",
                free_bytes: int | None = None) -> MemoryPlan:
    """The plan for one run, from configs on the meta device; `free_bytes` None: the device's free memory now."""
    from dpdiff.families import family_for_pipeline_class

    class_name, models, lengths = meta_components(name_or_path)
    family = family_for_pipeline_class(class_name)
    denoiser = models.pop(family.denoiser_attr)
    tokens = text_length(family, class_name, min(lengths.values(), default=None) if lengths else None)
    factor = _vae_factor(models.get("vae"))
    resolution = resolution or _native_latent(family, denoiser) * factor
    device = torch.device(device)
    plan = plan_denoiser(family, denoiser, method=method, precision=precision, rows=physical_batch_size * noise_multiplicity,
                         latent=(resolution // factor, resolution // factor), text_tokens=tokens, resolution=resolution,
                         gradient_checkpointing=gradient_checkpointing, rank=rank, lora_alpha=lora_alpha,
                         lora_target_modules=lora_target_modules, attention_start_index=attention_start_index,
                         train_condition_embedder=train_condition_embedder, ema=ema, grad_sample_mode=grad_sample_mode,
                         clipping=clipping, device=device)
    plan.encoder_bytes = _encoder_bytes(models, precision)
    plan.encoders_resident = device.type == "cpu"
    plan.available_bytes = free_bytes if free_bytes is not None else available_bytes(device)
    return plan


def _vae_factor(vae) -> int:
    """Pixels per latent: 2 per down block after the first (AutoencoderKL; Sana's AutoencoderDC names them
    encoder_block_out_channels: 32)."""
    blocks = getattr(vae.config, "block_out_channels", None) or getattr(vae.config, "encoder_block_out_channels", None) if vae else None
    return 2 ** (len(blocks) - 1) if blocks else 8


def _native_latent(family, denoiser) -> int:
    if family.name == "flux":  # Flux's transformer has no sample size: the pipeline's default 1024 px / 8
        return 128
    return int(denoiser.config.sample_size)


def _encoder_bytes(models: dict, precision: str) -> int:
    size = torch.tensor([], dtype=weight_dtype(precision)).element_size()
    return sum(p.numel() for m in models.values() for p in m.parameters()) * size


def plan_denoiser(family, denoiser: torch.nn.Module, *, method: str, precision: str, rows: int, latent: tuple[int, int],
                  text_tokens: int, resolution: int, gradient_checkpointing: bool = False, rank: int = 8, lora_alpha=None,
                  lora_target_modules=None, attention_start_index: int = 0, train_condition_embedder: bool = False,
                  ema: bool = True, grad_sample_mode: str = "auto", clipping: str = "flat",
                  device: torch.device = torch.device("cpu")) -> MemoryPlan:
    """The training phase of one meta `denoiser` (the trainable set is chosen here, as the run chooses it)."""
    dtype = weight_dtype(precision)
    denoiser.to("meta")  # buffers some configs compute on the CPU at init (PixArt's position table)
    family.train_mode(denoiser)
    prepare_trainable(denoiser, method, rank=rank, lora_alpha=lora_alpha, target_modules=lora_target_modules,
                      attention_start_index=attention_start_index, train_condition_embedder=train_condition_embedder,
                      family=family)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    trained = [p for p in denoiser.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in trained)
    n_total = sum(p.numel() for p in denoiser.parameters())
    element = torch.tensor([], dtype=dtype).element_size()
    lora = {id(p) for name, p in denoiser.named_parameters() if p.requires_grad and "lora_" in name}
    for p in denoiser.parameters():  # as autocast reads them: LoRA factors cast the input to fp32 (peft)
        p.data = p.data.to(torch.float32 if id(p) in lora else dtype)
    trace = trace_activations(family, denoiser, rows, latent, text_tokens, resolution, dtype)
    activations = trace.checkpointed() if gradient_checkpointing else trace.total
    mode = resolve_grad_sample_mode(denoiser, grad_sample_mode)
    factored = _factored_layers(denoiser, trace) if mode == FUSED_MODE and clipping == "flat" else {}
    dense = n_trained - sum(m.weight.numel() for m in factored)
    per_example = rows * 4 * dense + sum(rows * tokens * (_fan_in(m) + m.weight.shape[0]) * 4 for m, tokens in factored.items())
    return MemoryPlan(
        family=family.name, method=method, precision=precision, rows=rows, latent=tuple(latent),
        gradient_checkpointing=gradient_checkpointing, total_params=n_total, trained_params=n_trained,
        weight_bytes=(n_total - n_trained) * element + 4 * n_trained,
        state_bytes=4 * n_trained * (2 + int(ema)), step_bytes=4 * n_trained * STEP_COPIES, per_example_bytes=per_example,
        activation_bytes=int(ACTIVATION_FACTOR.get(family.name, ACTIVATION_FACTOR["default"]) * activations),
        runtime_bytes=RUNTIME_BYTES.get(device.type, RUNTIME_BYTES["cuda"]), encoder_bytes=0, encoders_resident=False,
        device=str(device), available_bytes=None)


def _fan_in(module) -> int:
    return math.prod(module.weight.shape[1:])


def _factored_layers(denoiser, trace) -> dict:
    """Trained Linear/Conv weights whose per-example gradients flat clipping's book-keeping keeps as (G, X) factors."""
    fused = {id(m) for m in fused_layers(denoiser)}
    return {m: tokens for m, tokens in trace.layer_tokens.items()
            if id(m) in fused and m.weight.requires_grad and worth_factoring(tokens, _fan_in(m), m.weight.shape[0])}
