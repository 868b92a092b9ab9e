"""Which parameters of a diffusers UNet train under DP-SGD, and how the result is saved.

Only the trainable parameters receive per-sample gradients and noise, so the choice of subset
decides both the privacy/utility trade-off (fewer parameters -> less total noise) and the cost.

- ``lora``      peft LoRA adapters on attention projections (DP-LoRA); exported in the diffusers
                LoRA format so the stock ``pipeline.load_lora_weights`` reloads it.
- ``attention`` the UNet's ``Transformer2DModel`` blocks from a chosen depth on (DP-LDM).
- ``full``      every UNet parameter (baseline).

``train_condition_embedder`` also trains the time/class embedding modules of the UNet fully.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dpdiff.errors import ConfigError
from dpdiff.io import atomic_dir, atomic_path, write_json

METHODS = ("lora", "attention", "full")
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# UNet children that embed the timestep / class / extra conditions (present ones are trained)
CONDITION_EMBEDDERS = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
EXTRA_WEIGHTS_NAME = "condition_embedder.safetensors"
MANIFEST_NAME = "dpdiff_trainable.json"


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under Opacus' GradSampleModule / DPDDP / DDP / Accelerate wrappers."""
    while True:
        inner = getattr(model, "_module", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def attention_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's transformer blocks in network-depth order (down, mid, up).

    Registration order in diffusers is down, up, mid, so `named_modules` order is not depth order."""
    blocks = []
    for prefix in ("down_blocks", "mid_block", "up_blocks"):
        part = getattr(unet, prefix, None)
        if part is None:
            continue
        for name, module in part.named_modules(prefix=prefix):
            if type(module).__name__ == "Transformer2DModel":
                blocks.append((name, module))
    return blocks


def prepare_trainable(
    unet: nn.Module,
    method: str,
    *,
    rank: int = 4,
    lora_alpha: float | None = None,
    target_modules: list[str] | tuple[str, ...] | None = None,
    attention_start_index: int = 0,
    train_condition_embedder: bool = False,
) -> TrainableSummary:
    """Freeze everything, then unfreeze (or add) the subset `method` names. Validates first."""
    if method not in METHODS:
        raise ConfigError(f"unknown trainable method {method!r}; choose one of {list(METHODS)}")
    check_per_sample_safe(unet)
    unet.requires_grad_(False)
    lora_config = None
    if method == "lora":
        lora_config = _add_lora(unet, rank, lora_alpha, target_modules)
    elif method == "attention":
        blocks = attention_blocks(unet)
        if not blocks:
            raise ConfigError("this UNet has no Transformer2DModel attention blocks; use method 'lora' or 'full'")
        if not 0 <= attention_start_index < len(blocks):
            raise ConfigError(
                f"attention_start_index={attention_start_index} is out of range: this UNet has {len(blocks)} "
                f"attention blocks (0..{len(blocks) - 1}, in depth order: {[n for n, _ in blocks]})"
            )
        for _, block in blocks[attention_start_index:]:
            block.requires_grad_(True)
    else:
        unet.requires_grad_(True)
    if train_condition_embedder:
        embedders = [getattr(unet, n) for n in CONDITION_EMBEDDERS if getattr(unet, n, None) is not None]
        if not embedders:
            raise ConfigError(f"train_condition_embedder=True but this UNet has none of {list(CONDITION_EMBEDDERS)}")
        for module in embedders:
            module.requires_grad_(True)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    return TrainableSummary(
        method=method,
        trainable_params=sum(p.numel() for p in unet.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in unet.parameters()),
        trainable_names=names,
        lora_config=lora_config,
    )


def check_per_sample_safe(unet: nn.Module) -> None:
    """Refuse models on which per-example clipping would not bound one example's influence."""
    if getattr(unet, "is_gradient_checkpointing", False):
        raise ConfigError(
            "gradient checkpointing is enabled on this UNet; with per-sample gradients (Opacus hooks/functorch) "
            "it silently drops the per-sample gradients of checkpointed blocks. Call "
            "`unet.disable_gradient_checkpointing()` and lower physical_batch_size to save memory instead"
        )
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
    targets = list(target_modules) if target_modules else list(DEFAULT_LORA_TARGETS)
    names = [n for n, _ in unet.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        # what a user can pass: the trailing names of the layers peft can adapt (Linear/Conv)
        layers = sorted({_trailing_name(n) for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise ConfigError(f"LoRA target module(s) {missing} match no module of this UNet. Layer names that exist: {layers}")
    config = LoraConfig(
        r=rank,
        lora_alpha=float(lora_alpha if lora_alpha is not None else rank),
        target_modules=targets,
        init_lora_weights="gaussian",
    )
    unet.add_adapter(config)
    return config.to_dict()


def _trailing_name(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def save_trained(unet: nn.Module, output_dir: str | os.PathLike, method: str) -> list[Path]:
    """Write the trained subset of `unet` (wrapped or not) into `output_dir`; returns the files written.

    lora      -> `pytorch_lora_weights.safetensors` (stock `pipeline.load_lora_weights`), plus
                 `condition_embedder.safetensors` if the embedder trained too;
    attention/full -> `unet/` (stock `UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`).
    Every file is replaced atomically; other files in `output_dir` (e.g. the privacy record) stay."""
    if method not in METHODS:
        raise ConfigError(f"unknown trainable method {method!r}; choose one of {list(METHODS)}")
    unet = unwrap_model(unet)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if method == "lora":
        written += _save_lora(unet, output_dir)
    else:
        with atomic_dir(output_dir / "unet") as tmp:
            unet.save_pretrained(tmp, safe_serialization=True)
        written.append(output_dir / "unet")
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    write_json(output_dir / MANIFEST_NAME, {"method": method, "trainable_names": trainable})
    return written + [output_dir / MANIFEST_NAME]


def _save_lora(unet, output_dir: Path) -> list[Path]:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = getattr(unet, "peft_config", {}).get("default")
    if config is None:
        raise ConfigError("method 'lora' but the UNet carries no LoRA adapter; call prepare_trainable(..., 'lora') first")
    # the PEFT key format: the older diffusers format (convert_state_dict_to_diffusers) reloads wrongly
    # once proj_in/proj_out carry LoRA (tested: those weights are silently dropped or misplaced)
    layers = get_peft_model_state_dict(unet)
    written = []
    with tempfile.TemporaryDirectory(prefix=".lora.", dir=output_dir) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True
        )
        os.replace(Path(tmp) / LORA_WEIGHTS_NAME, output_dir / LORA_WEIGHTS_NAME)
    written.append(output_dir / LORA_WEIGHTS_NAME)
    extra = {n: p.detach().contiguous().cpu() for n, p in unet.named_parameters() if p.requires_grad and "lora_" not in n}
    if extra:
        with atomic_path(output_dir / EXTRA_WEIGHTS_NAME) as tmp:
            save_file(extra, str(tmp))
        written.append(output_dir / EXTRA_WEIGHTS_NAME)
    return written


def load_trained(pipeline, output_dir: str | os.PathLike) -> None:
    """Apply what `save_trained` wrote to `pipeline` in place (LoRA, embedder weights or UNet)."""
    from safetensors.torch import load_file

    output_dir = Path(output_dir)
    manifest = output_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise ConfigError(f"{output_dir} has no {MANIFEST_NAME}; it was not written by dpdiff.adapters.save_trained")
    method = json.loads(manifest.read_text())["method"]
    if method == "lora":
        pipeline.load_lora_weights(output_dir)
        extra = output_dir / EXTRA_WEIGHTS_NAME
        if extra.is_file():
            _load_named(pipeline.unet, load_file(str(extra)))
    else:
        from diffusers import UNet2DConditionModel

        trained = UNet2DConditionModel.from_pretrained(output_dir, subfolder="unet")
        pipeline.unet.load_state_dict(trained.state_dict())


def _load_named(unet: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(unet.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ConfigError(f"saved weights name parameters this UNet lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
