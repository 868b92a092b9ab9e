"""What one training forward keeps for backward, measured on the meta device (shapes only, no memory).

A real-size denoiser's activation memory depends on its blocks, the resolution, the text length and the
attention kernel; a formula per family would drift with every diffusers release. Instead the denoiser
is built from its config on the meta device and run forward once; autograd's saved-tensor hooks report
every tensor kept for backward (weights excluded, each storage counted once). Gradient checkpointing is
traced through diffusers' own `gradient_checkpointing_func` hook, so the regions are exactly the
modules diffusers checkpoints. Attention is counted as the fused kernels keep it (q, k, v, output and
log-sum-exp; no T x T matrix), which is what torch's SDPA runs on CPU and on GPUs."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

CLIP_TOKENS = 77


@dataclass
class ActivationTrace:
    """Bytes saved for backward by one forward of `rows` rows."""

    rows: int
    total: int = 0  # everything saved, no checkpointing
    outside: int = 0  # saved outside the checkpointed regions
    regions: list = field(default_factory=list)  # (input bytes, saved bytes) of each checkpointed region call
    layer_tokens: dict = field(default_factory=dict)  # trained Linear/Conv module -> output positions per row

    def checkpointed(self) -> int:
        """Checkpointing keeps the regions' inputs, and recomputes one region at a time in backward."""
        if not self.regions:
            return self.total
        return self.outside + sum(i for i, _ in self.regions) + max(s for _, s in self.regions)


class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for SDPA's fused kernels: saves what flash / memory-efficient attention saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, g):  # never run: the trace is forward only
        raise NotImplementedError


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    return _FusedAttention.apply(query, key, value)


def condition_shapes(family, config, rows: int, text_length: int, resolution: int) -> dict[str, tuple]:
    """(shape, dtype) of each conditioning tensor the family's `predict` reads, as the latent cache holds them."""
    # the text encoder's width: T5/Gemma families project it (caption_channels / joint_attention_dim), UNets read it
    width = (getattr(config, "caption_channels", None) or getattr(config, "joint_attention_dim", None)
             or getattr(config, "cross_attention_dim", None))
    known = {
        "encoder_hidden_states": ((rows, text_length, int(width or 0)), torch.float32),
        "encoder_attention_mask": ((rows, text_length), torch.float32),
        "pooled_projections": ((rows, int(getattr(config, "pooled_projection_dim", 0) or 0)), torch.float32),
        "resolution": ((rows, 2), torch.float32),
        "aspect_ratio": ((rows, 1), torch.float32),
        "class_labels": ((rows,), torch.long),
        "time_ids": ((rows, 6), torch.float32),
    }
    if "text_embeds" in family.condition_keys:
        pooled = int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)
        known["text_embeds"] = ((rows, pooled), torch.float32)
    return {key: known[key] for key in family.condition_keys}


def text_length(family, pipeline_class: str | None, tokenizer_max_length: int | None) -> int:
    """Tokens of a cached prompt: the pipeline's `max_sequence_length` default (T5 / Gemma families), capped by
    the tokenizer; CLIP's 77 otherwise. SD3 concatenates CLIP's 77 tokens and T5's."""
    import diffusers

    call = getattr(getattr(diffusers, pipeline_class or "", None), "__call__", None)
    default = inspect.signature(call).parameters.get("max_sequence_length") if call else None
    length = default.default if default is not None and isinstance(default.default, int) else None
    if length is None:
        return CLIP_TOKENS
    if tokenizer_max_length:
        length = min(length, int(tokenizer_max_length))
    return length + CLIP_TOKENS if family.name == "sd3" else length


def trace_activations(family, denoiser: nn.Module, rows: int, latent: tuple[int, int], text_tokens: int,
                      resolution: int, dtype: torch.dtype) -> ActivationTrace:
    """One forward of `rows` rows of `latent` (h, w) through the meta `denoiser` (trainable set chosen;
    LoRA factors fp32, every other weight in `dtype`, as autocast reads them)."""
    trace = ActivationTrace(rows)
    weights = {p.untyped_storage()._cdata for p in denoiser.parameters()}
    seen: set = set()
    depth = [0]  # > 0 inside a checkpointed region
    current = [0]

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in weights and key not in seen:
            seen.add(key)
            current[0] += storage.nbytes()
            if depth[0] == 0:
                trace.outside += storage.nbytes()
        return t

    def region(module, *args):
        inputs = sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor))
        before = current[0]
        depth[0] += 1
        try:
            out = module(*args)
        finally:
            depth[0] -= 1
        trace.regions.append((inputs, current[0] - before))
        return out

    hooks = [m.register_forward_hook(_token_counter(trace)) for m in denoiser.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and any(p.requires_grad for p in m.parameters(recurse=False))]
    checkpointing = bool(getattr(denoiser, "is_gradient_checkpointing", False))
    if checkpointing:
        denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=region)
    config = denoiser.config
    channels = family.latent_channels(denoiser) or 4
    noisy = torch.zeros(rows, channels, *latent, device="meta", dtype=dtype)
    timesteps = torch.zeros(rows, device="meta")
    # float conditions as autocast hands them to the first matmul (the cache's fp32 rows are read once, then cast)
    conditions = {k: torch.zeros(shape, device="meta", dtype=dtype if dt.is_floating_point else dt)
                  for k, (shape, dt) in condition_shapes(family, config, rows, text_tokens, resolution).items()}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _patched(F, "scaled_dot_product_attention", _sdpa):
            with torch.enable_grad():
                out = family.predict(denoiser, noisy.requires_grad_(False), timesteps, conditions)
                (out.float() - noisy.float()).pow(2).mean()  # the loss's own saved tensors
    finally:
        for h in hooks:
            h.remove()
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
    trace.total = current[0]
    return trace


def _token_counter(trace: ActivationTrace):
    def hook(module, args, out):
        tokens = out[0, 0].numel() if isinstance(module, nn.Conv2d) else out[0].numel() // out.shape[-1]
        trace.layer_tokens[module] = max(trace.layer_tokens.get(module, 0), int(tokens))
    return hook


@contextlib.contextmanager
def _patched(owner, name, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
