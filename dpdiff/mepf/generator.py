"""DP-MEPF's generator: a small ResNet-style conditional generator, (z, one-hot label) -> image.

It never sees private data (only the released embedding, through the training loss), so it can be
saved, shared and retrained freely. Saved as `model.safetensors` + `config.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dpdiff.errors import ConfigError, IntegrityError
from dpdiff.io import atomic_dir, write_json

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATOR_DIR = "generator"  # inside a run's output folder


@dataclass
class GeneratorConfig:
    num_classes: int
    resolution: int
    channels: int
    z_dim: int = 64
    base_channels: int = 64
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.num_classes < 1 or self.channels not in (1, 3) or self.z_dim < 1 or self.base_channels < 4:
            raise ConfigError(f"invalid generator config: {self}")
        upsampling_plan(self.resolution)

    def to_dict(self) -> dict:
        return asdict(self)


def upsampling_plan(resolution: int) -> tuple[int, int]:
    """(start side, number of 2x upsamplings): 28 -> (7, 2), 32 -> (4, 3), 64 -> (4, 4)."""
    if resolution < 8:
        raise ConfigError(f"generator resolution must be at least 8, got {resolution}")
    ups = 0
    while ups < 4 and resolution % (2 ** (ups + 1)) == 0 and resolution // 2 ** (ups + 1) >= 4:
        ups += 1
    if ups == 0:
        raise ConfigError(f"generator resolution {resolution} must be divisible by 2 with a side of at least 4 left (e.g. 28, 32, 64)")
    return resolution // 2 ** ups, ups


class UpBlock(nn.Module):
    """Pre-activation residual block that doubles the side: BN-ReLU-up-conv-BN-ReLU-conv + up-1x1 skip."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class ConditionalGenerator(nn.Module):
    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.start, ups = upsampling_plan(config.resolution)
        widths = [config.base_channels * 2 ** (ups - i) for i in range(ups + 1)]
        self.project = nn.Linear(config.z_dim + config.num_classes, widths[0] * self.start ** 2)
        self.blocks = nn.Sequential(*[UpBlock(widths[i], widths[i + 1]) for i in range(ups)])
        self.out_bn = nn.BatchNorm2d(widths[-1])
        self.to_image = nn.Conv2d(widths[-1], config.channels, 3, padding=1)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """z [N, z_dim], labels [N] -> images [N, channels, resolution, resolution] in [-1, 1]."""
        one_hot = F.one_hot(labels.long(), self.config.num_classes).to(z.dtype)
        h = self.project(torch.cat([z, one_hot], dim=1)).view(z.shape[0], -1, self.start, self.start)
        h = F.relu(self.out_bn(self.blocks(h)))
        return torch.tanh(self.to_image(h))

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(labels.shape[0], self.config.z_dim, generator=generator)  # CPU draw: same images on any device
        device = self.project.weight.device
        return self(z.to(device), labels.to(device))


def save_generator(model: ConditionalGenerator, directory: str | os.PathLike) -> Path:
    """Write `directory` as a whole (atomic): model.safetensors + config.json."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "dpdiff": "mepf-generator"})
        write_json(tmp / CONFIG_FILE, model.config.to_dict())
    return directory


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> ConditionalGenerator:
    """A saved generator (its folder) in eval mode."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise IntegrityError(f"no MEPF generator at {path}: expected {WEIGHTS_FILE} and {CONFIG_FILE} there")
    try:
        config = GeneratorConfig(**json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))
        state = load_file(str(path / WEIGHTS_FILE))
    except (TypeError, ValueError, OSError) as e:
        raise IntegrityError(f"MEPF generator at {path} is unreadable: {e}") from e
    model = ConditionalGenerator(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise IntegrityError(f"MEPF generator weights at {path} do not match its config: {e}") from e
    return model.to(device).eval()
