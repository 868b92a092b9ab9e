"""Images -> VAE latents in batches bounded by memory, decoding only the batch being encoded.

A batch is sized by pixels, not images (`default_encode_batch_size`): the VAE's activations grow with
the image area, so 256 images a batch that fit at 32 px do not at 1024 px. Encoding runs where the VAE
is, in its dtype (the accelerator and the pipeline's dtype when the pipeline was moved there)."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from PIL import Image as PILImage

from dpdiff.data.transforms import images_to_tensor, prepare_image

# pixels per encode batch: 8 images at 512 px, 2 at 1024 px, 32 at 256 px (a real SD/SDXL/Flux VAE
# encoder needs roughly 1 GB of activations per 512-px image in fp32 without gradients)
ENCODE_PIXEL_BUDGET = 8 * 512 * 512
MAX_ENCODE_BATCH = 256


def default_encode_batch_size(resolution: int) -> int:
    """Images per VAE batch at `resolution`: the pixel budget, at least 1, at most MAX_ENCODE_BATCH."""
    return int(max(1, min(MAX_ENCODE_BATCH, ENCODE_PIXEL_BUDGET // (resolution * resolution))))


def storage_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype to keep a frozen encoder's outputs in: its own half precision, else fp32 (lossless)."""
    dtype = getattr(module, "dtype", torch.float32)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _decode(value) -> PILImage.Image:
    """One stored `datasets.Image` value ({"bytes", "path"}) or PIL image -> a decoded PIL image."""
    if isinstance(value, PILImage.Image):
        return value
    source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    with PILImage.open(source) as img:
        img.load()
        return img.copy()


def image_batches(dataset, batch_size: int, resolution: int, channels: int) -> Iterator[list[np.ndarray]]:
    """The dataset's images in order, `batch_size` at a time, each decoded, resized and centre-cropped to
    `resolution` on a few threads (PIL decodes without the GIL) and dropped after its batch: arrays
    [resolution, resolution(, 3)] uint8. Only one batch of images is ever decoded."""
    from datasets import Image

    column = dataset.select_columns(["image"])
    if isinstance(column.features["image"], Image):
        column = column.cast_column("image", Image(decode=False))  # decode here, on threads

    def load(value):
        return np.asarray(prepare_image(_decode(value), resolution, channels))

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in range(0, len(column), batch_size):
            yield list(pool.map(load, column[start : start + batch_size]["image"]))


def arrays_to_tensor(arrays: list[np.ndarray], mirrored: bool = False) -> torch.Tensor:
    """Prepared uint8 arrays -> [N, C, H, W] in [-1, 1] (`mirrored`: flipped left-right)."""
    x = torch.from_numpy(np.stack(arrays)).float()
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if mirrored:
        x = x.flip(-1)
    return x / 127.5 - 1.0


@torch.no_grad()
def encode_pixels(vae, x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> posterior means, shifted and scaled as the families' training scripts do
    ((z - shift_factor) * scaling_factor; shift 0 for SD's VAE), fp32 on the CPU. A deterministic
    autoencoder (Sana's AutoencoderDC) returns its latent directly."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # one memory layout for every batch: a channels-last input (the permuted decoded arrays) takes other conv
    # kernels than a contiguous one (a padded batch), and they round differently
    encoded = vae.encode(x.to(vae.device, vae.dtype).contiguous())
    dist = getattr(encoded, "latent_dist", None)
    z = dist.mode() if dist is not None else encoded.latent
    return ((z.float() - shift) * scale).cpu()


@torch.no_grad()
def encode_fixed_batch(vae, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`encode_pixels` on a batch padded with blank images to exactly `batch_size` rows, then trimmed.

    Kernels choose their blocking by the number of rows (a batch of one gave other fp32 bits than a batch
    of two here), so a short last batch would round its images differently: an image's cached latent
    would depend on how many others share its batch, i.e. on the rest of the private set. One shape
    for every batch makes each latent a function of its own image alone."""
    n = len(x)
    if n < batch_size:
        x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
    return encode_pixels(vae, x)[:n]


@torch.no_grad()
def encode_images(vae, images, resolution: int, batch_size: int | None = None, show_progress: bool = True,
                  mirrored: bool = False) -> torch.Tensor:
    """A list of PIL images -> [N, C, h, w] latents (fp32, CPU), `batch_size` (default: by pixels) at a time.

    `mirrored`: encode each image flipped left-right (the latents `--random_flip` draws from; the VAE
    is not equivariant to flips, so flipping a latent is not the latent of the flipped image)."""
    from tqdm.auto import tqdm

    batch_size = batch_size or default_encode_batch_size(resolution)
    out = []
    desc = "encoding mirrored latents" if mirrored else "encoding latents"
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not show_progress):
        x = images_to_tensor(images[i : i + batch_size], resolution, channels=vae.config.in_channels, mirrored=mirrored)
        out.append(encode_fixed_batch(vae, x, batch_size))  # one shape (and layout): see encode_fixed_batch
    return torch.cat(out)
