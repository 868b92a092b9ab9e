"""The on-disk latent cache: the same rows as encoding in memory, reused without re-encoding when its
fingerprint matches, refused when not, never half-written, and every entry a function of one example."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dpdiff.data.encode as encode_module
import dpdiff.training.latent_cache as latent_cache
from dpdiff.data import load_source
from dpdiff.data.encode import default_encode_batch_size
from dpdiff.errors import DataError
from dpdiff.training.latent_cache import build_latent_cache, cache_size_bytes


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def write_folder(root, n=6, size=(40, 48), seed=0, captions=None):
    """`n` JPEGs with a metadata.jsonl `text` caption each."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"{i:03d}.jpg", quality=95)
        rows.append({"file_name": f"{i:03d}.jpg", "text": captions[i] if captions else "a small red shoe " * (i % 3 + 1)})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.fixture(scope="module")
def sd_pipe():
    from dpdiff.pipelines.tiny_families import build_tiny_family_pipeline

    return build_tiny_family_pipeline("sd15")


def same_rows(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(torch.as_tensor(x[key]), torch.as_tensor(y[key]), rtol=0, atol=0)


def test_disk_cache_matches_memory_and_is_reused_without_encoding(sd_pipe, tmp_path, monkeypatch):
    source = load_source(f"imagefolder:{write_folder(tmp_path / 'data')}")
    memory = build_latent_cache(sd_pipe, source, 64, random_flip=True, show_progress=False)
    disk = build_latent_cache(sd_pipe, source, 64, random_flip=True, show_progress=False, cache_dir=tmp_path / "cache")
    assert disk.folder == tmp_path / "cache" and memory.folder is None
    assert not isinstance(disk.latents, torch.Tensor)  # rows are read from the shards on demand
    same_rows(memory, disk)
    assert tuple(disk.latents.shape) == (6, 4, 8, 8) and cache_size_bytes(disk.folder) > 6 * 4 * 8 * 8 * 4

    def never(*args, **kwargs):
        raise AssertionError("a matching cache must not be encoded again")

    monkeypatch.setattr(encode_module, "encode_pixels", never)
    monkeypatch.setattr(type(sd_pipe.text_encoder), "forward", never)
    again = build_latent_cache(sd_pipe, load_source(f"imagefolder:{tmp_path / 'data'}"), 64, random_flip=True,
                               show_progress=False, cache_dir=tmp_path / "cache")
    same_rows(disk, again)


@pytest.mark.parametrize("change", ["resolution", "flip", "caption", "file", "model"])
def test_a_cache_built_for_other_data_or_settings_is_refused(sd_pipe, tmp_path, change):
    from dpdiff.pipelines.tiny_families import build_tiny_family_pipeline

    folder = write_folder(tmp_path / "data")
    build_latent_cache(sd_pipe, load_source(f"imagefolder:{folder}"), 64, show_progress=False, cache_dir=tmp_path / "cache")
    pipe, resolution, flip = sd_pipe, 64, False
    if change == "resolution":
        resolution = 128
    elif change == "flip":
        flip = True
    elif change == "caption":
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        lines[2] = json.dumps({"file_name": "002.jpg", "text": "another caption"})
        (folder / "metadata.jsonl").write_text("\n".join(lines))
    elif change == "file":
        Image.new("RGB", (40, 48), (9, 9, 9)).save(folder / "001.jpg")
    else:
        pipe = build_tiny_family_pipeline("sd15", seed=1)
    with pytest.raises(DataError, match=r"latent cache in .*cache was built for other .*--cache_dir"):
        build_latent_cache(pipe, load_source(f"imagefolder:{folder}"), resolution, random_flip=flip, show_progress=False,
                           cache_dir=tmp_path / "cache")
    # replacing it (the default cache of an --overwrite_output_dir run) encodes the new one
    cache = build_latent_cache(pipe, load_source(f"imagefolder:{folder}"), resolution, random_flip=flip, show_progress=False,
                               cache_dir=tmp_path / "cache", replace_mismatch=True)
    assert len(cache) == 6


def test_a_killed_build_leaves_no_cache(sd_pipe, tmp_path, monkeypatch):
    source = load_source(f"imagefolder:{write_folder(tmp_path / 'data', n=5)}")
    real, calls = encode_module.encode_pixels, []

    def dies_on_the_second_batch(vae, x):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill while encoding
        return real(vae, x)

    monkeypatch.setattr(encode_module, "encode_pixels", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(sd_pipe, source, 64, batch_size=2, show_progress=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob(".cache.building-*"))
    monkeypatch.setattr(encode_module, "encode_pixels", real)
    cache = build_latent_cache(sd_pipe, source, 64, batch_size=2, show_progress=False, cache_dir=tmp_path / "cache")
    assert len(cache) == 5 and (tmp_path / "cache" / "manifest.json").is_file()
    (tmp_path / "cache" / "latents-00000.safetensors").unlink()  # a cache damaged by hand is named, not half-read
    with pytest.raises(DataError, match="lacks 1 file.*latents-00000"):
        build_latent_cache(sd_pipe, source, 64, batch_size=2, show_progress=False, cache_dir=tmp_path / "cache")


def test_a_folder_that_is_not_a_cache_is_refused(sd_pipe, tmp_path):
    source = load_source(f"imagefolder:{write_folder(tmp_path / 'data', n=2)}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a dpdiff latent cache"):
        build_latent_cache(sd_pipe, source, 64, show_progress=False, cache_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="--encode_batch_size must be a positive integer"):
        build_latent_cache(sd_pipe, source, 64, batch_size=0, show_progress=False, cache_dir=tmp_path / "new")


def test_encode_batches_are_bounded_by_pixels(sd_pipe, tmp_path, monkeypatch):
    assert [default_encode_batch_size(r) for r in (1024, 512, 256, 64, 32)] == [2, 8, 32, 256, 256]
    source = load_source(f"imagefolder:{write_folder(tmp_path / 'data', n=5)}")
    real, sizes = encode_module.encode_pixels, []
    monkeypatch.setattr(encode_module, "encode_pixels", lambda vae, x: sizes.append(tuple(x.shape)) or real(vae, x))
    decoded = []
    real_decode = encode_module._decode
    monkeypatch.setattr(encode_module, "_decode", lambda value: decoded.append(1) or real_decode(value))
    build_latent_cache(sd_pipe, source, 512, show_progress=False, cache_dir=tmp_path / "c512")
    assert sizes == [(8, 3, 512, 512)]  # 8 a batch at 512 px (the 5 images padded to the one batch shape)
    sizes.clear()
    build_latent_cache(sd_pipe, source, 1024, show_progress=False, cache_dir=tmp_path / "c1024")
    assert sizes == [(2, 3, 1024, 1024)] * 3
    assert len(decoded) == 10  # each image decoded once per cache, a batch at a time


def test_every_entry_is_a_function_of_its_own_example(sd_pipe, tmp_path):
    """Privacy: an example's latents and conditioning do not depend on the other examples, their number,
    their captions' lengths or the encode batch they shared."""
    captions = ["a shoe", "a very long caption about a red leather boot with laces " * 3, "x", "a bag", "a coat", "a hat"]
    big = write_folder(tmp_path / "big", n=6, captions=captions)
    small = tmp_path / "small"
    small.mkdir()
    (small / "000.jpg").write_bytes((big / "000.jpg").read_bytes())
    (small / "metadata.jsonl").write_text(json.dumps({"file_name": "000.jpg", "text": captions[0]}))
    a = build_latent_cache(sd_pipe, load_source(f"imagefolder:{big}"), 64, show_progress=False, cache_dir=tmp_path / "a",
                           batch_size=4)
    b = build_latent_cache(sd_pipe, load_source(f"imagefolder:{small}"), 64, show_progress=False, cache_dir=tmp_path / "b",
                           batch_size=1)
    for key in a[0]:
        torch.testing.assert_close(a[0][key], b[0][key], rtol=0, atol=2e-6)
    # with the same (public) encode batch size, bit for bit: every batch and caption chunk has one shape, so
    # the kernels round an example the same whether it shares its batch with five others or with none (a
    # batch of one rounded the VAE's fp32 latents differently from a batch of two before they were padded)
    c = build_latent_cache(sd_pipe, load_source(f"imagefolder:{small}"), 64, show_progress=False, cache_dir=tmp_path / "c",
                           batch_size=4)
    for key in a[0]:
        assert torch.equal(a[0][key], c[0][key]), key


@pytest.mark.parametrize("build", ["pixart_sigma", "sana"])
def test_masked_captions_are_stored_at_their_own_length_and_predict_the_same(build, tmp_path):
    """Long-text-encoder families with an attention mask: a caption is kept at its own token count (not the
    family's padded length) and read back zero-padded to that fixed length, which the denoiser's mask hides:
    the prediction equals the one on the pipeline's own padded encoding, whatever the batch."""
    from dpdiff.families import family_for_pipeline
    from dpdiff.pipelines.tiny_families import build_tiny_family_pipeline

    pipe = build_tiny_family_pipeline(build)
    family = family_for_pipeline(pipe)
    captions = ["a shoe", "a long caption about a red leather boot with laces", "x", "a bag"]
    source = load_source(f"imagefolder:{write_folder(tmp_path / 'data', n=4, size=(32, 32), captions=captions)}")
    cache = build_latent_cache(pipe, source, 64, show_progress=False, cache_dir=tmp_path / "cache", family=family)
    assert cache.manifest["conditions"]["ragged"] == ["encoder_hidden_states"]
    full = family.encode_conditions(pipe, captions + [""], 64)
    length, width = full["encoder_hidden_states"].shape[1:]
    stored = cache_size_bytes(tmp_path / "cache")
    assert stored < cache.manifest["conditions"]["counts"][0] * length * width * 4  # less than the padded captions alone
    rows = [cache[i] for i in range(4)]
    torch.testing.assert_close(torch.stack([r["encoder_attention_mask"] for r in rows]), full["encoder_attention_mask"][:4])
    denoiser = family.denoiser(pipe)
    latents = torch.stack([r["latents"] for r in rows])
    t = torch.tensor([500] * 4)
    with torch.no_grad():
        cached = family.predict(denoiser, latents, t, {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "latents"})
        padded = family.predict(denoiser, latents, t, {k: v[:4] for k, v in full.items()})
        alone = family.predict(denoiser, latents[1:2], t[:1], {k: rows[1][k][None] for k in rows[1] if k != "latents"})
    torch.testing.assert_close(cached, padded, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached[1:2], alone, rtol=1e-4, atol=1e-5)


def test_a_resumed_run_and_a_second_run_encode_nothing(tiny_pipeline_dir, tmp_path, monkeypatch):
    from dpdiff.training.arguments import finetune_args
    from dpdiff.training.loop import finetune

    data = write_folder(tmp_path / "data", n=8, size=(32, 32))
    flags = dict(pretrained_model_name_or_path=str(tiny_pipeline_dir), dataset=f"imagefolder:{data}", output_dir=str(tmp_path / "run"),
                 batch_size=4, physical_batch_size=4, max_steps=2, delta=1e-2, num_inference_steps=1, checkpointing_steps=1,
                 privacy_seed=1, rank=2, ema_decay=0.0, resolution=32)
    finetune(finetune_args(**flags))
    cache = tmp_path / "run" / "latent_cache"
    built = (cache / "manifest.json").stat().st_mtime_ns

    def never(*args, **kwargs):
        raise AssertionError("the cache must be reused, not encoded again")

    monkeypatch.setattr(encode_module, "encode_pixels", never)
    resumed = finetune(finetune_args(**{**flags, "resume_from_checkpoint": "latest"}))  # from step 1's checkpoint
    assert resumed.record["steps"] == 2
    # another resolution on resume: the same data must not be silently re-encoded under a running guarantee
    with pytest.raises(DataError, match="resolution"):
        finetune(finetune_args(**{**flags, "resume_from_checkpoint": "latest", "resolution": 16}))
    again = finetune(finetune_args(**{**flags, "overwrite_output_dir": True, "checkpointing_steps": 0}))
    assert again.record["steps"] == 2 and (cache / "manifest.json").stat().st_mtime_ns == built
