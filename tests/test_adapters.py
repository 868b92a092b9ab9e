"""Trainable subsets on the real tiny UNet: counts, refusals, and exact export/reload."""

import json

import pytest
import torch
from torch import nn

from dpdiff.adapters import (
    DEFAULT_LORA_TARGETS,
    attention_blocks,
    load_trained,
    prepare_trainable,
    save_trained,
)
from dpdiff.errors import ConfigError
from dpdiff.pipelines.preset import build_tiny_pipeline, build_tiny_unet

PROMPTS = ["a photo of a shoe", "a photo of a shirt", "a photo of a bag"]


def lora_count(unet, targets, rank):
    """r*(in+out) per adapted Linear, computed from the layer shapes themselves."""
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def test_lora_trains_only_adapters_on_the_targets():
    unet = build_tiny_unet()
    expected = lora_count(unet, DEFAULT_LORA_TARGETS, 4)
    base_total = sum(p.numel() for p in unet.parameters())
    summary = prepare_trainable(unet, "lora", rank=4)
    assert summary.trainable_params == expected > 0
    assert summary.total_params == base_total + expected
    assert all("lora_" in n for n in summary.trainable_names)
    assert {n.split(".lora_")[0].split(".")[-1] for n in summary.trainable_names} == {"to_q", "to_k", "to_v", "0"}
    assert summary.trainable_params == sum(p.numel() for p in unet.parameters() if p.requires_grad)


def test_lora_with_condition_embedder_adds_the_time_embedding():
    unet = build_tiny_unet()
    embedding = sum(p.numel() for p in unet.time_embedding.parameters())
    expected = lora_count(unet, ["to_k"], 2) + embedding
    summary = prepare_trainable(unet, "lora", rank=2, target_modules=["to_k"], train_condition_embedder=True)
    assert summary.trainable_params == expected
    assert any(n.startswith("time_embedding.") for n in summary.trainable_names)


def test_attention_trains_transformer_blocks_from_the_start_index_in_depth_order():
    unet = build_tiny_unet()
    blocks = attention_blocks(unet)
    assert [n.split(".")[0] for n, _ in blocks] == ["down_blocks"] * 2 + ["mid_block"] + ["up_blocks"] * 4
    summary = prepare_trainable(unet, "attention", attention_start_index=2)
    expected = sum(p.numel() for _, block in blocks[2:] for p in block.parameters())
    assert summary.trainable_params == expected
    assert not any(p.requires_grad for _, block in blocks[:2] for p in block.parameters())
    assert not any(p.requires_grad for p in unet.conv_in.parameters())
    with pytest.raises(ConfigError, match="0..6"):
        prepare_trainable(build_tiny_unet(), "attention", attention_start_index=7)


def test_full_trains_everything():
    unet = build_tiny_unet()
    summary = prepare_trainable(unet, "full")
    assert summary.trainable_params == summary.total_params == sum(p.numel() for p in unet.parameters())


def test_refusals():
    with pytest.raises(ConfigError, match=r"\['nope'\].*to_q"):
        prepare_trainable(build_tiny_unet(), "lora", target_modules=["to_q", "nope"])
    with pytest.raises(ConfigError, match="unknown trainable method"):
        prepare_trainable(build_tiny_unet(), "prefix")
    unet = build_tiny_unet()
    unet.enable_gradient_checkpointing()  # allowed here: the engine decides (tests/test_checkpointing.py)
    prepare_trainable(unet, "lora")
    unet = build_tiny_unet()
    unet.conv_norm_out = nn.BatchNorm2d(64)  # mixes the examples of a batch
    with pytest.raises(ConfigError, match="BatchNorm"):
        prepare_trainable(unet, "full")


def unet_output(unet):
    g = torch.Generator().manual_seed(3)
    sample, hidden = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), encoder_hidden_states=hidden).sample


def pretend_training(unet):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


# every LoRA-able layer kind of the UNet: attention and feed-forward Linears, the 1x1 proj_in/proj_out
# and 3x3 resnet convolutions, the time projection (the older diffusers key format lost proj_in/out)
WIDE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "time_emb_proj"]


@pytest.mark.parametrize("embedder, targets", [(False, None), (True, None), (False, WIDE_TARGETS)])
def test_lora_export_reloads_exactly_with_stock_load_lora_weights(tmp_path, embedder, targets):
    pipeline = build_tiny_pipeline(PROMPTS)
    base = unet_output(pipeline.unet)
    prepare_trainable(pipeline.unet, "lora", rank=4, lora_alpha=16, train_condition_embedder=embedder, target_modules=targets)
    pretend_training(pipeline.unet)
    trained = unet_output(pipeline.unet)
    (tmp_path / "privacy.json").write_text("{}")  # written earlier by the training loop: must survive
    save_trained(pipeline.unet, tmp_path, "lora")
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "privacy.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    fresh = build_tiny_pipeline(PROMPTS)
    if embedder:
        load_trained(fresh, tmp_path)
    else:
        fresh.load_lora_weights(tmp_path)  # the stock diffusers path, nothing of dpdiff
    reloaded = unet_output(fresh.unet)
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)
    assert fresh.unet.peft_config["default_0"].lora_alpha == 16


@pytest.mark.parametrize("method", ["attention", "full"])
def test_unet_export_reloads_exactly(tmp_path, method):
    pipeline = build_tiny_pipeline(PROMPTS)
    base = unet_output(pipeline.unet)
    prepare_trainable(pipeline.unet, method, attention_start_index=1)
    pretend_training(pipeline.unet)
    trained = unet_output(pipeline.unet)
    save_trained(pipeline.unet, tmp_path, method)
    manifest = json.loads((tmp_path / "dpdiff_trainable.json").read_text())
    assert manifest["method"] == method and manifest["trainable_names"]
    fresh = build_tiny_pipeline(PROMPTS)
    load_trained(fresh, tmp_path)
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(unet_output(fresh.unet), trained, rtol=0, atol=0)


def test_sd15_shaped_unet_counts_on_the_meta_device():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            layers_per_block=2, sample_size=64,
        )
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # the published SD-1.5 UNet size
    expected = lora_count(unet, DEFAULT_LORA_TARGETS, 4)
    summary = prepare_trainable(unet, "lora", rank=4)
    assert summary.trainable_params == expected == 797_184
