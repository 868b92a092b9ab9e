"""The one place that turns images into model inputs and back (resolution and channels)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# the VAE downsampling factor of the Stable Diffusion family (and SDXL, SD3, Flux): a training
# resolution must be a multiple of it (a pipeline with another factor is checked when it is loaded)
VAE_FACTOR = 8


def check_resolution(resolution, factor: int = VAE_FACTOR, flag: str = "--resolution") -> int:
    """A positive multiple of the VAE factor, or one clear error."""
    from dpdiff.errors import ConfigError

    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % factor:
        raise ConfigError(f"{flag} must be a positive multiple of {factor} (the VAE factor times the denoiser's patch size), "
                          f"got {resolution!r}")
    return resolution


def prepare_image(image: Image.Image, resolution: int, channels: int, mirrored: bool = False) -> Image.Image:
    """Any mode/size -> `channels` (1 grey, 3 RGB) at resolution x resolution: resize the shorter
    side, then centre-crop (28x28 Fashion-MNIST -> 32x32 for the preset). That is what diffusers'
    `--center_crop` does (Resize + CenterCrop), and it is always done: a cached latent cannot take
    diffusers' default per-step random crop. `mirrored`: then flip left-right (`--random_flip`)."""
    image = image.convert("RGB" if channels == 3 else "L")
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    if mirrored:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def images_to_tensor(images: list[Image.Image], resolution: int = 32, channels: int = 3, mirrored: bool = False) -> torch.Tensor:
    """PIL images -> float tensor [N, C, H, W] in [-1, 1] (`mirrored`: each flipped left-right)."""
    arrays = [np.asarray(prepare_image(im, resolution, channels, mirrored), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor, channels: int = 3, resolution: int | None = None) -> list[Image.Image]:
    """[N, C, H, W] in [-1, 1] -> PIL images with `channels`, optionally resized (e.g. back to 28)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    out = []
    for a in arr:
        img = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
        img = img.convert("L" if channels == 1 else "RGB")
        if resolution is not None and img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.BICUBIC)
        out.append(img)
    return out
