"""Models, data and the two steps that benchmarks/dp_overhead.py times side by side.

A `Setup` is one denoiser ready to train (trainable subset already chosen) with its family and a
latent cache; `plain_step` and `dp_step` build the non-DP and DP step on it. Both draw noise and
timesteps per example from the same keyed generators, collate the same cached examples and run the
same objective, so the only difference is what DP adds (per-example gradients, clipping, noise)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from dataclasses import dataclass

import torch
from torch.utils.data import default_collate

from dpdiff.adapters import prepare_trainable
from dpdiff.families import family_for_denoiser, family_for_pipeline
from dpdiff.families.base import UNCONDITIONAL_PROMPT
from dpdiff.privacy.diffusion_loss import example_generator
from dpdiff.training.latent_cache import LatentCache
from dpdiff.privacy.engine import DPDiffusionEngine

TOKENS = 8
FAMILY_ROWS = ("sd15", "sdxl", "pixart_sigma", "sd3", "flux", "sana", "dit")
PROMPTS = ["a photo of a shirt", "a photo of a boot", "a sketch of a bag", "a drawing of a dress"]

# GPU-sized shapes (random init): SD-1.5's and SDXL's UNet configs, DiT-XL/2. `tiny` scales each down for
# a CPU dry run of the same code path (same block types, conditioning and family).
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
DIT = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
           sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
# PixArt-alpha's transformer (PixArt-XL-2-512x512; the 1024-MS checkpoint is the same with sample_size 128 and
# its resolution/aspect-ratio micro-conditions): 28 blocks x 1152, T5-XXL hidden states (4096) of 120 tokens
PIXART = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              cross_attention_dim=1152, attention_bias=True, sample_size=64, patch_size=2, activation_fn="gelu-approximate",
              num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
              caption_channels=4096)
PIXART_TOKENS = 120
REAL_SHAPES = {"sd15": SD15, "sdxl": SDXL, "pixart": PIXART}
TINY = {"sd15": dict(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        "sdxl": dict(block_out_channels=(32, 32, 64), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(8, 8, 16),
                     cross_attention_dim=32, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                     norm_num_groups=8),
        "dit": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2)}


def real_shape_model(shape: str, latent: int, dtype=torch.float32, device="cpu"):
    """The denoiser of a real config (random init) built directly in `dtype` (no fp32 copy of SDXL's 2.6B
    weights on the way), with its family and one example's conditioning shapes."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    from dpdiff.families.registry import family_named

    config = REAL_SHAPES[shape] | dict(sample_size=latent)
    if shape == "pixart":
        config |= dict(use_additional_conditions=latent == 128)
    cls = PixArtTransformer2DModel if shape == "pixart" else UNet2DConditionModel
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    family = family_named({"sd15": "sd", "sdxl": "sdxl", "pixart": "pixart"}[shape])
    return model, family


def real_shape_conditions(shape: str, n: int, latent: int) -> dict:
    """Cached conditioning rows (fp32, as the latent cache holds them) for n examples."""
    g = torch.Generator().manual_seed(2)
    config = REAL_SHAPES[shape]
    if shape == "pixart":
        return {"encoder_hidden_states": torch.randn(n, PIXART_TOKENS, config["caption_channels"], generator=g),
                "encoder_attention_mask": torch.ones(n, PIXART_TOKENS), "resolution": torch.full((n, 2), latent * 8.0),
                "aspect_ratio": torch.ones(n, 1)}
    conditions = {"encoder_hidden_states": torch.randn(n, 77, config["cross_attention_dim"], generator=g)}
    if shape == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        conditions |= {"text_embeds": torch.randn(n, pooled, generator=g),
                       "time_ids": torch.tensor([latent * 8, latent * 8, 0, 0, latent * 8, latent * 8.0]).expand(n, 6).clone()}
    return conditions


@dataclass
class Setup:
    model: torch.nn.Module
    family: object
    scheduler: object
    data: torch.utils.data.Dataset


def _ddpm():
    from diffusers import DDPMScheduler

    from dpdiff.pipelines.preset import SCHEDULER_CONFIG

    return DDPMScheduler(**SCHEDULER_CONFIG)


def _finish(model, method, n, latent, conditions, family=None, scheduler=None, device="cpu"):
    family = family or family_for_denoiser(model)
    family.train_mode(model)
    prepare_trainable(model, method, family=family)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(n, family.latent_channels(model) or 4, latent, latent, generator=g)
    return Setup(model.to(device), family, scheduler or _ddpm(), LatentCache.per_example(latents, conditions))


def unet_setup(kind: str, method: str, n: int, device="cpu") -> Setup:
    """'preset': the dpdiff-tiny pipeline's UNet (32,64), 8x8; 'wide': (64,128), 2 layers per block, 8x8."""
    from dpdiff.pipelines import load_pipeline
    from dpdiff.pipelines.preset import build_tiny_unet

    model = (load_pipeline("dpdiff-tiny").unet if kind == "preset"
             else build_tiny_unet(seed=0, block_out_channels=(64, 128), layers_per_block=2))
    hidden = torch.randn(n, TOKENS, model.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    return _finish(model, method, n, model.config.sample_size, {"encoder_hidden_states": hidden}, device=device)


def family_setup(build: str, method: str, n: int, device="cpu") -> Setup:
    """A tiny random-weight build of the family's stock pipeline; conditions through its own encoders."""
    from dpdiff.pipelines.tiny_families import build_tiny_family_pipeline

    pipe = build_tiny_family_pipeline(build)
    family = family_for_pipeline(pipe)
    keys = [i % 8 for i in range(n)] + [-1] if family.conditioning == "label" else \
        [PROMPTS[i % len(PROMPTS)] for i in range(n)] + [UNCONDITIONAL_PROMPT]
    conditions = {k: v[:n] for k, v in family.encode_conditions(pipe, keys, 32).items()}
    model = family.denoiser(pipe)
    return _finish(model, method, n, 8, conditions, family, family.training_scheduler(pipe), device)


def gpu_setup(shape: str, method: str, n: int, latent: int, device="cuda", tiny=False) -> Setup:
    """SD-1.5- / SDXL-shaped UNet or DiT-XL/2, random init from the config (`tiny`: scaled down, for CPU)."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    config = {"sd15": SD15, "sdxl": SDXL, "dit": DIT}[shape] | (TINY[shape] if tiny else {})
    with torch.device(device):  # random init on the GPU: seconds, not minutes, for SDXL's 2.6B parameters
        model = (DiTTransformer2DModel if shape == "dit" else UNet2DConditionModel)(**(config | dict(sample_size=latent)))
    if shape == "dit":
        conditions = {"class_labels": torch.randint(0, 1000, (n,), generator=g)}
    else:
        conditions = {"encoder_hidden_states": torch.randn(n, 77, config["cross_attention_dim"], generator=g)}
        if shape == "sdxl":
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            conditions |= {"text_embeds": torch.randn(n, pooled, generator=g),
                           "time_ids": torch.tensor([latent * 8, latent * 8, 0, 0, latent * 8, latent * 8.0]).expand(n, 6)}
    from dpdiff.families.registry import family_named

    family = family_named("sdxl") if shape == "sdxl" else None  # the class alone says "sd"
    return _finish(model, method, n, latent, conditions, family, device=device)


def _autocast(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class PlainStep:
    """Non-private fine-tuning as a plain loop does it: collate, draw, mean loss, backward, SGD step."""

    def __init__(self, setup: Setup, precision="fp32"):
        self.s, self.precision, self.steps = setup, precision, 0
        self.objective = setup.family.objective(setup.scheduler)
        self.device = next(setup.model.parameters()).device
        self.optimizer = torch.optim.SGD([p for p in setup.model.parameters() if p.requires_grad], lr=1e-4)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def __call__(self):
        s, n = self.s, len(self.s.data)
        batch = default_collate([s.data[i] for i in range(n)])
        latents = batch["latents"].to(self.device)
        conditions = {k: batch[k].to(self.device) for k in s.family.condition_keys}
        noise, timesteps = self.objective.draw(latents, 1, [example_generator(0, self.steps, i) for i in range(n)])
        with _autocast(self.device, self.precision):
            loss = self.objective.per_row_loss(lambda x, t: s.family.predict(s.model, x, t, conditions),
                                               latents, noise, timesteps).mean()
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1


class DPStep:
    """The engine's whole logical step on every cached example (per-example grads, clip, noise, step)."""

    def __init__(self, setup: Setup, mode="auto", precision="fp32"):
        params = [p for p in setup.model.parameters() if p.requires_grad]
        self.engine = DPDiffusionEngine(
            setup.model, setup.scheduler, torch.optim.SGD(params, lr=1e-4), setup.data, batch_size=len(setup.data),
            physical_batch_size=len(setup.data), noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
            privacy_seed=0, family=setup.family, precision={"fp32": "no"}.get(precision, precision))
        self.indices = list(range(len(setup.data)))

    def __call__(self):
        self.engine._logical_step(self.indices)


# ---- memory -------------------------------------------------------------------------------------

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """CPU: highest RSS seen while the block runs (sampled every 0.5 ms from a thread; torch ops release
    the GIL) minus RSS just before. CUDA: torch.cuda.max_memory_allocated minus memory_allocated before."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        self.before = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.used = torch.cuda.max_memory_allocated() - self.before
            return
        self._stop.set()
        self._thread.join()
        self.used = max(self.peak, rss()) - self.before


def release_freed_memory_to_os():
    """glibc: return every block >= 64 KiB to the OS on free, so RSS follows the step's working memory."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
