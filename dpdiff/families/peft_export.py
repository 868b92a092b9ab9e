"""LoRA export for denoisers whose diffusers pipeline has no LoRA loader (PixArt, DiT).

The adapter is plain peft: `pytorch_lora_weights.safetensors` (peft keys) next to `adapter_config.json`
(the peft `LoraConfig`, so alpha and rank reload exactly). peft's own `inject_adapter_in_model` +
`set_peft_model_state_dict` load it into the stock pipeline's transformer (`load_peft_lora`)."""

from __future__ import annotations

import json
from pathlib import Path

from dpdiff.families.base import LORA_WEIGHTS_NAME
from dpdiff.io import atomic_path, write_json

ADAPTER_CONFIG_NAME = "adapter_config.json"


def save_peft_lora(output_dir: Path, layers: dict, metadata: dict) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in layers.items()}
    with atomic_path(output_dir / LORA_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    write_json(output_dir / ADAPTER_CONFIG_NAME, config)
    return output_dir / LORA_WEIGHTS_NAME


def load_peft_lora(denoiser, run_dir: Path) -> None:
    """Add the saved adapter to `denoiser` (in place); refuses keys that do not fit."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from dpdiff.errors import ConfigError

    run_dir = Path(run_dir)
    config_file = run_dir / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} has no {ADAPTER_CONFIG_NAME}: it is not a LoRA adapter of a PixArt/DiT run")
    config = LoraConfig(**{k: v for k, v in json.loads(config_file.read_text()).items()
                           if k in LoraConfig.__dataclass_fields__})
    inject_adapter_in_model(config, denoiser)
    result = set_peft_model_state_dict(denoiser, load_file(str(run_dir / LORA_WEIGHTS_NAME)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ConfigError(f"the adapter in {run_dir} names layers this {type(denoiser).__name__} lacks: {unexpected[:5]}")


class PeftExport:
    """Family mixin: LoRA export/import through plain peft, for pipelines without a LoRA loader."""

    stock_lora_loader = False

    def save_lora(self, denoiser, output_dir, layers, metadata):
        return save_peft_lora(output_dir, layers, metadata)

    def load_lora(self, pipeline, run_dir):
        load_peft_lora(self.denoiser(pipeline), run_dir)

    def usage_load_lora(self, repo):
        return (f'from huggingface_hub import snapshot_download\nfrom dpdiff.families.peft_export import load_peft_lora\n'
                f'load_peft_lora(pipe.transformer, snapshot_download("{repo}"))  # plain peft: inject + set_peft_model_state_dict')
