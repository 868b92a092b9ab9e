"""The diffusers data flags: --image_column/--caption_column, imagefolder `text` captions, --resolution,
--center_crop and --random_flip (a second, mirrored latent per image chosen by a public coin)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dpdiff.data import load_source
from dpdiff.data.transforms import images_to_tensor, prepare_image
from dpdiff.errors import ConfigError, DataError
from dpdiff.training.arguments import finetune_args
from dpdiff.training.latent_cache import LatentCache, build_latent_cache, encode_images


def _png(path, value, size=(16, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 40)).save(path)


def _text_folder(root, n=4, subfolders=False):
    rows = []
    for i in range(n):
        name = f"{['cat', 'dog'][i % 2]}/{i}.png" if subfolders else f"{i}.png"
        _png(root / name, 40 * i + 10)
        rows.append({"file_name": name, "text": f"a caption number {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_imagefolder_metadata_text_is_the_prompt(tmp_path):
    src = load_source(f"imagefolder:{_text_folder(tmp_path / 'flat')}")
    assert list(src.dataset["prompt"]) == [f"a caption number {i}" for i in range(4)]
    # no labels: one public class, so nothing released (grid, generation_config) shows a private caption
    assert src.class_names == ["image"] and list(src.dataset["label"]) == [0] * 4
    assert src.class_prompts == ["a photo of an image"]
    # class sub-folders + captions: labels from the folders, prompts from the metadata
    sub = load_source(f"imagefolder:{_text_folder(tmp_path / 'sub', subfolders=True)}")
    assert sub.class_names == ["cat", "dog"] and list(sub.dataset["label"]) == [0, 0, 1, 1]  # cat/0 cat/2 dog/1 dog/3
    assert list(sub.dataset["prompt"]) == [f"a caption number {i}" for i in (0, 2, 1, 3)]
    # --caption_column names another key; a key the lines lack is one error naming the keys they have
    assert load_source(f"imagefolder:{tmp_path / 'flat'}", caption_column="text").dataset["prompt"][1] == "a caption number 1"
    with pytest.raises(DataError, match=r"no column 'caption'.*its columns are file_name, text"):
        load_source(f"imagefolder:{tmp_path / 'flat'}", caption_column="caption")


def _saved_dataset(path, image="img", caption="caption", n=6):
    from datasets import Dataset, Features, Image as ImageFeature, Value

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(n)]
    features = Features({image: ImageFeature(), caption: Value("string"), "id": Value("int64")})
    Dataset.from_dict({image: images, caption: [f"picture {i}" for i in range(n)], "id": list(range(n))},
                      features=features).save_to_disk(str(path))
    return path


def test_saved_datasets_folder_with_named_columns(tmp_path):
    path = _saved_dataset(tmp_path / "ds", image="picture", caption="description")
    src = load_source(str(path), image_column="picture", caption_column="description")
    assert len(src) == 6 and list(src.dataset["prompt"]) == [f"picture {i}" for i in range(6)]
    assert src.dataset[0]["image"].size == (24, 20) and src.class_names == ["image"]
    assert len(load_source(str(path), limit=3, image_column="picture", caption_column="description")) == 3
    # columns that autodetection does not know: one error that says which exist and which flags to use
    with pytest.raises(DataError, match=r"its columns are picture, description, id: name them with --image_column"):
        load_source(str(path))
    # the brief's img/caption columns load by name (and are autodetected)
    named = _saved_dataset(tmp_path / "ds2")
    assert load_source(str(named), image_column="img", caption_column="caption").dataset["prompt"][2] == "picture 2"
    assert load_source(str(named)).dataset["prompt"][2] == "picture 2"


@pytest.mark.parametrize("flags, match", [
    ({"image_column": "foo"}, r"no column 'foo' for --image_column; its columns are img, caption, id"),
    ({"caption_column": "text"}, r"no column 'text' for --caption_column; its columns are img, caption, id"),
    ({"caption_column": "id"}, r"caption column 'id' must hold strings"),
])
def test_missing_or_wrong_column_is_one_clear_error(tmp_path, flags, match):
    path = _saved_dataset(tmp_path / "ds")
    with pytest.raises(DataError, match=match) as info:
        load_source(str(path), **flags)
    assert "\n" not in str(info.value)


def test_offline_sources_name_their_columns():
    assert len(load_source("mnist5k", limit=4, image_column="image", caption_column="prompt")) == 4
    with pytest.raises(DataError, match=r"mnist5k has no column 'img' for --image_column; its columns are image, label, prompt"):
        load_source("mnist5k", limit=4, image_column="img")


@pytest.mark.parametrize("resolution", [12, 0, -8, 100])
def test_resolution_not_a_multiple_of_8_is_refused_before_reading_data(resolution):
    with pytest.raises(ConfigError, match=rf"--resolution must be a positive multiple of 8 .*got {resolution}"):
        load_source("imagefolder:/does/not/exist", resolution=resolution)  # the resolution is checked first


def test_center_crop_keeps_the_middle():
    # a 48x16 image in three 16-pixel bands: only the middle (green) band survives at 16x16
    wide = np.zeros((16, 48, 3), dtype=np.uint8)
    wide[:, :16], wide[:, 16:32], wide[:, 32:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = np.asarray(prepare_image(Image.fromarray(wide), 16, 3))
    assert out.shape == (16, 16, 3) and (out == (0, 255, 0)).all()
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 16 wide, 48 tall: the middle rows
    assert (np.asarray(prepare_image(Image.fromarray(tall), 16, 3)) == (0, 255, 0)).all()
    # downscaled (96x32 -> 16): still the middle third, interior pixels pure green
    big = np.asarray(prepare_image(Image.fromarray(wide).resize((96, 32), Image.NEAREST), 16, 3))
    assert (big[:, 2:-2] == (0, 255, 0)).all()
    x = images_to_tensor([Image.fromarray(wide)], 16, 3)
    assert torch.allclose(x[0, 1], torch.ones(16, 16)) and torch.allclose(x[0, 0], -torch.ones(16, 16))


def _cache(n=5, flipped=True, seed=3):
    latents = torch.randn(n, 4, 2, 2)
    return LatentCache(latents=latents, prompt_ids=torch.zeros(n, dtype=torch.long),
                       prompt_embeddings=torch.zeros(2, 3, 8), labels=torch.zeros(n, dtype=torch.long), seed=seed,
                       flipped_latents=latents + 100 if flipped else None)


def test_flip_coin_is_public_reproducible_and_fair():
    cache = _cache()
    coins = np.array([[cache.flipped(i, step) for i in range(5)] for step in range(400)])
    assert 0.45 < coins.mean() < 0.55 and 0 < coins[:, 0].mean() < 1
    again = _cache()  # a fresh cache (a resumed run): the same choices at the same (seed, step, index)
    assert all(again.flipped(i, s) == coins[s, i] for s in (0, 17, 399) for i in range(5))
    assert [_cache(seed=4).flipped(i, s) for s in range(40) for i in range(5)] != coins[:40].ravel().tolist()
    for step in (0, 1, 2):
        cache.step = step
        for i in range(5):
            want = cache.flipped_latents[i] if coins[step, i] else cache.latents[i]
            assert torch.equal(cache[i]["latents"], want)
    # the dropout coin (seed + 1) and the flip coin (seed + 2) are different coins
    from dpdiff.privacy.diffusion_loss import example_generator
    drop = [bool(torch.rand((), generator=example_generator(cache.seed + 1, s, 0)) < 0.5) for s in range(400)]
    assert drop != coins[:, 0].tolist()
    # without flipped latents (the default, and every existing caller): never flipped
    plain = _cache(flipped=False)
    assert not any(plain.flipped(i, s) for s in range(20) for i in range(5))
    assert torch.equal(plain[2]["latents"], plain.latents[2])


def test_flipped_latent_is_the_latent_of_the_mirrored_image(tiny_pipeline_dir):
    from dpdiff.pipelines import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir))
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    from dpdiff.data.sources import build_dataset, ImageSource

    source = ImageSource("x", "train", build_dataset(images, [0, 1, 0], ["a", "b"]), ["a", "b"])
    cache = build_latent_cache(pipe, source, 16, seed=0, show_progress=False, random_flip=True)
    mirrored = encode_images(pipe.vae, [ImageOps.mirror(im) for im in images], 16, show_progress=False)
    assert cache.flipped_latents.shape == cache.latents.shape
    assert torch.allclose(cache.flipped_latents, mirrored, atol=1e-5)
    assert not torch.allclose(cache.flipped_latents, cache.latents.flip(-1), atol=1e-3)  # why it is encoded
    assert build_latent_cache(pipe, source, 16, show_progress=False).flipped_latents is None
    with pytest.raises(ConfigError, match=r"--resolution must be a positive multiple of 4"):
        build_latent_cache(pipe, source, 18, show_progress=False)


def test_resolution_16_trains_end_to_end_and_is_recorded(tiny_pipeline_dir, tmp_path):
    import yaml

    from dpdiff.training.loop import finetune

    out = tmp_path / "run"
    args = finetune_args(pretrained_model_name_or_path=str(tiny_pipeline_dir), output_dir=str(out),
                         dataset=f"imagefolder:{_text_folder(tmp_path / 'data', n=16, subfolders=True)}",
                         batch_size=8, physical_batch_size=8, max_steps=2, delta=1e-3, target_epsilon=8.0,
                         num_inference_steps=1, checkpointing_steps=0, privacy_seed=1, ema_decay=0,
                         resolution=16, random_flip=True, center_crop=True, caption_column="text")
    result = finetune(args)
    assert result.record["steps"] == 2
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["resolution"] == 16 and generation["class_names"] == ["cat", "dog"]
    replay = yaml.safe_load((out / "training_config.yaml").read_text())
    assert replay["resolution"] == 16 and replay["random_flip"] is True and replay["caption_column"] == "text"
    assert "a caption number" not in (out / "generation_config.json").read_text()


def test_bad_resolution_is_refused_before_any_work(tiny_pipeline_dir, tmp_path):
    from dpdiff.training.loop import finetune

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--resolution must be a positive multiple of 8 .*got 20") as info:
        finetune(finetune_args(pretrained_model_name_or_path=str(tiny_pipeline_dir), output_dir=str(out),
                               dataset="fashion_mnist", max_train_samples=16, batch_size=8, physical_batch_size=8,
                               max_steps=1, delta=1e-3, resolution=20))
    assert "\n" not in str(info.value) and not out.exists()
    with pytest.raises(DataError, match=r"fashion_mnist has no column 'img'") :
        finetune(finetune_args(pretrained_model_name_or_path=str(tiny_pipeline_dir), output_dir=str(out),
                               dataset="fashion_mnist", max_train_samples=16, batch_size=8, physical_batch_size=8,
                               max_steps=1, delta=1e-3, image_column="img"))
    assert not out.exists()
