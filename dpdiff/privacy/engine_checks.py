"""What the DP engine refuses, all checked before any work or any private data is touched."""

from __future__ import annotations

import math

import torch
from torch import nn

from dpdiff.adapters import check_per_sample_safe, params_without_grad_sampler
from dpdiff.errors import ConfigError, DataError, PrivacyError
from dpdiff.privacy.grad_samplers import FUSED_MODE, MODE_ALIASES, fused_layers, unfused_trainable

GRAD_SAMPLE_MODES = ("auto", FUSED_MODE, *MODE_ALIASES, "hooks", "ew", "functorch")
CLIPPING_MODES = ("flat", "per_layer")
PRECISIONS = ("no", "bf16", "fp16")  # Accelerate's --mixed_precision values


def checked_timestep_weights(weights: torch.Tensor | None, num_train_timesteps: int) -> torch.Tensor | None:
    if weights is None:
        return None
    weights = torch.as_tensor(weights, dtype=torch.float64).cpu()
    if weights.shape != (num_train_timesteps,) or not bool((weights >= 0).all()) or not weights.sum() > 0:
        raise ConfigError(
            f"timestep_weights must be {num_train_timesteps} non-negative weights with a positive sum (one per training "
            f"timestep of the scheduler), got shape {tuple(weights.shape)}; build them with diffusion_loss.timestep_weights"
        )
    return weights


def trains_convolution(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and any(p.requires_grad for p in m.parameters(recurse=False)) for m in model.modules())


def resolve_grad_sample_mode(model: nn.Module, grad_sample_mode: str) -> str:
    """'auto': the fused mode when any LoRA, Linear, Conv2d or norm layer trains (per-example gradients inside the
    layer's backward, no summed weight gradient; every other trained module on Opacus hooks in the same
    wrapper): measured fastest, benchmarks/dp_overhead.py; otherwise Opacus hooks, which run on every
    family's layers and under autocast. (Expanded weights, 'ew', fail on trained convolutions, on
    autocast and on the PixArt blocks' parameter indexing: offered, never chosen.)"""
    grad_sample_mode = MODE_ALIASES.get(grad_sample_mode, grad_sample_mode)
    if grad_sample_mode != "auto":
        return grad_sample_mode
    return FUSED_MODE if fused_layers(model) else "hooks"


def check_checkpointing(model: nn.Module, grad_sample_mode: str) -> None:
    """Gradient checkpointing recomputes a block's forward during backward. The fused Functions survive
    that (the wrapper keeps them on through backward; tests/test_checkpointing.py); Opacus' hooks do not
    (they silently leave `p.grad` and no `grad_sample` for the checkpointed blocks), so any trained
    parameter on hooks refuses it."""
    if not getattr(model, "is_gradient_checkpointing", False):
        return
    mode = resolve_grad_sample_mode(model, grad_sample_mode)
    on_hooks = unfused_trainable(model) if mode == FUSED_MODE else [n for n, p in model.named_parameters() if p.requires_grad]
    if on_hooks:
        raise ConfigError(
            f"gradient checkpointing is enabled, but {len(on_hooks)} trained parameter(s) (e.g. {on_hooks[:3]}) get "
            f"per-example gradients from Opacus hooks (mode {mode!r}), which checkpointing silently breaks. Only "
            "the fused mode (grad_sample_mode 'auto' or 'fused': LoRA, Linear, zero-padded ungrouped Conv2d, "
            "LayerNorm/GroupNorm) is checkpoint-safe: freeze the other layers or call `disable_gradient_checkpointing()` "
            "and lower physical_batch_size to save memory instead"
        )


def unused_lora_parameters(model: nn.Module) -> list[str]:
    """Trained LoRA parameters no forward uses: those of a merged or disabled LoRA layer or of an inactive adapter.
    They get no per-example gradient (the first step would fail inside Opacus) and could only ever receive noise."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # peft absent: no LoRA layers
        return []
    unused = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        idle, active = layer.merged or layer.disable_adapters, set(layer.active_adapters)
        for kind in layer.adapter_layer_names:
            for adapter, part in getattr(layer, kind).items():
                trained = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
                if (idle or adapter not in active) and any(p.requires_grad for p in trained):
                    unused.append(f"{name}.{kind}.{adapter}")
    return unused


def validate(model, params, optimizer, dataset, batch_size, physical_batch_size, noise_multiplier, max_grad_norm,
              noise_multiplicity, grad_sample_mode, clipping, secure_mode, privacy_seed, distributed, family, precision) -> None:
    """Every refusal happens here, before any work or any private data is touched."""
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"grad_sample_mode {grad_sample_mode!r} is not supported; choose one of {list(GRAD_SAMPLE_MODES)} "
            "(ghost norms / book-keeping clipping are part of 'fused', used per layer where they are cheaper)"
        )
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not supported; choose one of {list(PRECISIONS)} (Accelerate's --mixed_precision)")
    if clipping not in CLIPPING_MODES:
        raise ConfigError(f"clipping {clipping!r} is not supported; choose one of {list(CLIPPING_MODES)}")
    if grad_sample_mode == "ew" and trains_convolution(model):
        raise ConfigError(
            "grad_sample_mode='ew' cannot train convolutions here (torch's expanded-weights conv backward fails on "
            "the UNet's non-contiguous gradients); use grad_sample_mode='hooks' or 'auto' (the default)"
        )
    if grad_sample_mode == "ew" and precision != "no":
        raise ConfigError(f"grad_sample_mode='ew' cannot run under {precision} autocast (torch's expanded weights mix "
                          "dtypes); use grad_sample_mode='hooks' or 'auto' (the default)")
    if clipping == "per_layer" and distributed:
        raise ConfigError("per_layer clipping is not supported with distributed=True; use clipping='flat'")
    if not params:
        raise ConfigError("the model has no trainable parameters; call dpdiff.adapters.prepare_trainable first")
    if isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__module__.startswith("opacus"):
        raise ConfigError("pass a plain torch optimizer; the engine wraps it with Opacus itself")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if in_optimizer != {id(p) for p in params}:
        raise ConfigError(
            "the optimizer must hold exactly the trainable parameters of the model "
            "(build it from [p for p in unet.parameters() if p.requires_grad] after prepare_trainable)"
        )
    check_per_sample_safe(model)
    unused = unused_lora_parameters(model)
    if unused:
        raise ConfigError(
            f"{len(unused)} trained LoRA part(s) (e.g. {unused[:3]}) are never used by the forward: their layer is merged "
            "or its adapters are disabled, or the adapter is not active. They would get no per-example gradient, only "
            "noise: unmerge / enable / activate the adapter (peft's set_adapter), or freeze its parameters"
        )
    check_checkpointing(model, grad_sample_mode)
    unruled = params_without_grad_sampler(model)
    if unruled:
        raise ConfigError(
            f"no per-example gradient rule exists for the trainable parameter(s) {unruled[:5]}; freeze them "
            "(dpdiff.adapters.prepare_trainable leaves them frozen) or register an Opacus grad sampler for their module"
        )
    for name, value in (("noise_multiplier", noise_multiplier), ("max_grad_norm", max_grad_norm)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PrivacyError(f"{name} must be a finite number, got {value!r}")
    if noise_multiplier < 0:
        raise PrivacyError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if max_grad_norm <= 0:
        raise PrivacyError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    for name, value in (("batch_size", batch_size), ("physical_batch_size", physical_batch_size),
                        ("noise_multiplicity", noise_multiplicity)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if physical_batch_size > batch_size:
        raise ConfigError(
            f"physical_batch_size ({physical_batch_size}) > batch_size ({batch_size}); the physical batch only "
            "splits the expected logical batch, so set physical_batch_size <= batch_size"
        )
    if len(dataset) == 0:
        raise DataError("the private dataset is empty")
    if batch_size > len(dataset):
        raise ConfigError(f"batch_size ({batch_size}) exceeds the private dataset size ({len(dataset)})")
    if secure_mode and privacy_seed is not None:
        raise PrivacyError("secure_mode=True forbids privacy_seed: the sampling and noise must be unpredictable")
    if secure_mode and clipping != "flat":
        raise ConfigError("secure_mode draws the noise from the OS CSPRNG with flat clipping only; use clipping='flat' "
                          "(or leave secure_mode off: torch's generator seeded from OS entropy)")
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ConfigError(
            "distributed=True but no process group is initialised; create the Accelerator first "
            "(`accelerate launch --multi_gpu --num_processes N ...`; `--cpu` alone starts ONE process)"
        )
    first = dataset[0]
    required = ["latents", *family.condition_keys]
    if not isinstance(first, dict) or any(k not in first for k in required):
        raise DataError(
            f"private dataset items must be dicts with keys {required} (a latent cache of the {family.name!r} model "
            f"family); got {type(first).__name__} with keys {sorted(first) if isinstance(first, dict) else None}"
        )
    in_channels = family.latent_channels(model) if hasattr(model, "config") else None
    if in_channels is not None and first["latents"].shape[0] != in_channels:
        raise DataError(
            f"cached latents have {first['latents'].shape[0]} channels but the denoiser expects {in_channels}; "
            "the latent cache was built with another VAE"
        )
