"""Which parameters of a diffusers denoiser (UNet or transformer) train under DP-SGD, and how the result is saved.

Only the trainable parameters receive per-sample gradients and noise, so the choice of subset
decides both the privacy/utility trade-off (fewer parameters -> less total noise) and the cost.

- ``lora``      peft LoRA adapters on attention projections (DP-LoRA); exported in the diffusers
                LoRA format so the family's stock pipeline reloads it (``load_lora_weights``).
- ``attention`` the attention (transformer) blocks from a chosen depth on (DP-LDM): a UNet's
                ``Transformer2DModel`` blocks, a DiT's transformer blocks.
- ``full``      every denoiser parameter (baseline).

``train_condition_embedder`` also trains the time/class/text embedding modules fully. What each of
these means for a model family (targets, blocks, embedders, export) comes from `dpdiff.families`.
"""

from __future__ import annotations

import json
import os
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dpdiff.errors import ConfigError
from dpdiff.families import family_for_denoiser, family_for_pipeline
from dpdiff.families.base import LORA_WEIGHTS_NAME, unwrap_model  # noqa: F401  (re-exported)
from dpdiff.families.stable_diffusion import StableDiffusionFamily
from dpdiff.io import atomic_dir, atomic_path, write_json
from dpdiff.run_files import EXTRA_WEIGHTS_NAME, MANIFEST_NAME  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)
METHODS = ("lora", "attention", "full")
DEFAULT_LORA_TARGETS = StableDiffusionFamily.default_lora_targets
# UNet children that embed the timestep / class / extra conditions (present ones are trained)
CONDITION_EMBEDDERS = StableDiffusionFamily.condition_embedders


@dataclass
class TrainableSummary:
    """What trains: recorded next to the weights and on the model card."""

    method: str
    trainable_params: int
    total_params: int
    trainable_names: list[str] = field(repr=False)
    lora_config: dict | None = None

    @property
    def fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}


def attention_blocks(model: nn.Module, family=None) -> list[tuple[str, nn.Module]]:
    """The blocks `--method attention` trains, in network-depth order (a UNet: down, mid, up)."""
    return (family or family_for_denoiser(model)).attention_blocks(model)


def prepare_trainable(
    unet: nn.Module,
    method: str,
    *,
    rank: int = 4,
    lora_alpha: float | None = None,
    target_modules: list[str] | tuple[str, ...] | None = None,
    attention_start_index: int = 0,
    train_condition_embedder: bool = False,
    family=None,
) -> TrainableSummary:
    """Freeze everything, then unfreeze (or add) the subset `method` names. Validates first.

    `unet`: the denoiser of any supported family (UNet or transformer); `family` defaults to the one
    of its class and supplies the default LoRA targets, the attention blocks and the embedders."""
    if method not in METHODS:
        raise ConfigError(f"unknown trainable method {method!r}; choose one of {list(METHODS)}")
    family = family or family_for_denoiser(unet)
    check_per_sample_safe(unet)
    unet.requires_grad_(False)
    lora_config = None
    if method == "lora":
        lora_config = _add_lora(unet, rank, lora_alpha, target_modules or family.default_lora_targets)
    elif method == "attention":
        blocks = family.attention_blocks(unet)
        if not blocks:
            raise ConfigError(f"this {type(unet).__name__} has no attention blocks to train; use method 'lora' or 'full'")
        if not 0 <= attention_start_index < len(blocks):
            raise ConfigError(
                f"attention_start_index={attention_start_index} is out of range: this model has {len(blocks)} "
                f"attention blocks (0..{len(blocks) - 1}, in depth order: {[n for n, _ in blocks]})"
            )
        for _, block in blocks[attention_start_index:]:
            block.requires_grad_(True)
    else:
        unet.requires_grad_(True)
    if train_condition_embedder:
        embedders = [getattr(unet, n) for n in family.condition_embedders if getattr(unet, n, None) is not None]
        if not embedders:
            raise ConfigError(f"train_condition_embedder=True but this {type(unet).__name__} has none of "
                              f"{list(family.condition_embedders)}")
        for module in embedders:
            module.requires_grad_(True)
    left_frozen = freeze_without_grad_sampler(unet)
    if left_frozen:
        logger.warning("left frozen (no per-example gradient rule for the module that owns them): %s", left_frozen)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    return TrainableSummary(
        method=method,
        trainable_params=sum(p.numel() for p in unet.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in unet.parameters()),
        trainable_names=names,
        lora_config=lora_config,
    )


def params_without_grad_sampler(model: nn.Module) -> list[str]:
    """Trainable parameters owned directly by a module Opacus has no per-example rule for (e.g. the
    `scale_shift_table` of PixArt/Sana blocks, diffusers' own RMSNorm). Opacus would fall back to
    functorch, which re-runs such a module on its first input only: a block that takes the timestep as
    a keyword then fails, or, worse, could get per-example gradients that are silently wrong."""
    from opacus.grad_sample import GradSampleModule

    return [f"{module_name}.{name}" if module_name else name
            for module_name, module in model.named_modules()
            for name, p in module.named_parameters(recurse=False)
            if p.requires_grad and type(module) not in GradSampleModule.GRAD_SAMPLERS]


def freeze_without_grad_sampler(model: nn.Module) -> list[str]:
    names = params_without_grad_sampler(model)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def check_per_sample_safe(unet: nn.Module) -> None:
    """Refuse models on which per-example clipping would not bound one example's influence."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(unet, strict=False)
    if errors:
        raise ConfigError(
            "the model has modules that mix examples in a batch or cannot give per-sample gradients "
            f"({'; '.join(str(e) for e in errors)}); replace them (e.g. BatchNorm -> GroupNorm, "
            "`opacus.validators.ModuleValidator.fix`) before private training"
        )


def _add_lora(unet, rank, lora_alpha, target_modules) -> dict:
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    targets = list(target_modules)
    names = [n for n, _ in unet.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        # what a user can pass: the trailing names of the layers peft can adapt (Linear/Conv)
        layers = sorted({_trailing_name(n) for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise ConfigError(f"LoRA target module(s) {missing} match no module of this {type(unet).__name__}. Layer names that exist: {layers}")
    config = LoraConfig(
        r=rank,
        lora_alpha=float(lora_alpha if lora_alpha is not None else rank),
        target_modules=targets,
        init_lora_weights="gaussian",
    )
    if hasattr(unet, "add_adapter"):  # diffusers' PeftAdapterMixin
        unet.add_adapter(config)
    else:  # PixArt/DiT transformers: plain peft, the config kept where diffusers keeps it
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, unet)
        unet.peft_config = {"default": config}
    return config.to_dict()


def _trailing_name(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def save_trained(unet: nn.Module, output_dir: str | os.PathLike, method: str, family=None) -> list[Path]:
    """Write the trained subset of the denoiser `unet` (wrapped or not) into `output_dir`; returns the files written.

    lora      -> `pytorch_lora_weights.safetensors` where the family's stock pipeline loads it
                 (`load_lora_weights`; PixArt/DiT: `transformer.load_lora_adapter`), plus
                 `condition_embedder.safetensors` if the embedder trained too;
    attention/full -> `unet/` or `transformer/` (the family's denoiser folder: stock `from_pretrained`).
    Every file is replaced atomically; other files in `output_dir` (e.g. the privacy record) stay."""
    if method not in METHODS:
        raise ConfigError(f"unknown trainable method {method!r}; choose one of {list(METHODS)}")
    unet = unwrap_model(unet)
    family = family or family_for_denoiser(unet)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if method == "lora":
        written += _save_lora(unet, output_dir, family)
    else:
        with atomic_dir(output_dir / family.denoiser_attr) as tmp:
            unet.save_pretrained(tmp, safe_serialization=True)
        written.append(output_dir / family.denoiser_attr)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    write_json(output_dir / MANIFEST_NAME, {"method": method, "family": family.name, "trainable_names": trainable})
    return written + [output_dir / MANIFEST_NAME]


def _save_lora(unet, output_dir: Path, family) -> list[Path]:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = getattr(unet, "peft_config", {}).get("default")
    if config is None:
        raise ConfigError("method 'lora' but the denoiser carries no LoRA adapter; call prepare_trainable(..., 'lora') first")
    # the PEFT key format: the older diffusers format (convert_state_dict_to_diffusers) reloads wrongly
    # once proj_in/proj_out carry LoRA (tested: those weights are silently dropped or misplaced)
    layers = get_peft_model_state_dict(unet)
    written = [family.save_lora(unet, output_dir, layers, config.to_dict())]
    extra = {n: p.detach().contiguous().cpu() for n, p in unet.named_parameters() if p.requires_grad and "lora_" not in n}
    if extra:
        with atomic_path(output_dir / EXTRA_WEIGHTS_NAME) as tmp:
            save_file(extra, str(tmp))
        written.append(output_dir / EXTRA_WEIGHTS_NAME)
    return written


def load_trained(pipeline, output_dir: str | os.PathLike) -> None:
    """Apply what `save_trained` wrote to `pipeline` in place (LoRA, embedder weights or denoiser)."""
    from safetensors.torch import load_file

    output_dir = Path(output_dir)
    manifest = output_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise ConfigError(f"{output_dir} has no {MANIFEST_NAME}; it was not written by dpdiff.adapters.save_trained")
    method = json.loads(manifest.read_text())["method"]
    family = family_for_pipeline(pipeline)
    denoiser = family.denoiser(pipeline)
    if method == "lora":
        family.load_lora(pipeline, output_dir)
        extra = output_dir / EXTRA_WEIGHTS_NAME
        if extra.is_file():
            _load_named(denoiser, load_file(str(extra)))
    else:
        trained = type(denoiser).from_pretrained(output_dir, subfolder=family.denoiser_attr)
        denoiser.load_state_dict(trained.state_dict())


def _load_named(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ConfigError(f"saved weights name parameters this {type(model).__name__} lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
