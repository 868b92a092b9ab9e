"""Every data source loads offline with the right shapes, labels and prompts; bad input is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dpdiff.data import load_source
from dpdiff.data.sources import FASHION_MNIST_CLASSES, prompt_for
from dpdiff.data.transforms import images_to_tensor, prepare_image, tensor_to_images
from dpdiff.errors import DataError


@pytest.mark.parametrize(
    "name,split,num_classes,first_class",
    [("fashion_mnist", "train", 10, "T-shirt/top"), ("fashion_mnist", "test", 10, "T-shirt/top"),
     ("mnist5k", "train", 10, "digit 0"), ("animal_mnist", "train", 10, "bear")],
)
def test_offline_sources(name, split, num_classes, first_class):
    src = load_source(name, split, limit=300, seed=1)
    assert len(src) == 300
    assert src.class_names[0] == first_class and len(src.class_names) == num_classes
    row = src.dataset[0]
    assert row["image"].size == (28, 28) and row["image"].mode == "L"
    assert row["prompt"] == prompt_for(src.class_names[row["label"]])
    labels = np.array(src.dataset["label"])
    assert labels.min() >= 0 and labels.max() < num_classes
    assert len(np.unique(labels)) >= 8  # a seeded random subset covers the classes
    # the pixels are real images, not blanks
    assert np.asarray(row["image"]).std() > 10


def test_full_sizes_and_determinism():
    assert len(load_source("mnist5k")) == 5000
    a = load_source("animal_mnist", limit=50, seed=3)
    b = load_source("animal_mnist", limit=50, seed=3)
    assert a.dataset["label"] == b.dataset["label"]
    assert np.array_equal(np.asarray(a.dataset[7]["image"]), np.asarray(b.dataset[7]["image"]))


def test_fashion_mnist_full_split_sizes():
    test = load_source("fashion_mnist", "test")
    assert len(test) == 10_000
    assert np.bincount(test.dataset["label"]).tolist() == [1000] * 10


def test_prompts_name_classes():
    assert prompt_for("Sneaker") == "a photo of a sneaker"
    assert prompt_for("Ankle boot") == "a photo of an ankle boot"
    assert prompt_for("T-shirt/top") == "a photo of a t-shirt or top"
    assert len(set(prompt_for(c) for c in FASHION_MNIST_CLASSES)) == 10


def test_transforms_grey_to_rgb_and_back():
    img = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    x = images_to_tensor([img, img], resolution=32, channels=3)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch_equal(x[:, 0], x[:, 1])
    back = tensor_to_images(x, channels=1, resolution=28)
    assert back[0].mode == "L" and back[0].size == (28, 28)
    # mixed sizes and modes are converted, not refused
    odd = Image.new("RGBA", (40, 20), (10, 200, 30, 255))
    assert prepare_image(odd, 32, 3).size == (32, 32)


def torch_equal(a, b):
    return bool((a == b).all())


def _write_png(path, value=128, size=(28, 28), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_prompt_template_captions_every_example_from_its_label(tmp_path):
    src = load_source("mnist5k", limit=40, prompt_template="a sketch of {class_name}, class {label}")
    assert src.class_prompts[3] == "a sketch of digit 3, class 3"
    assert src.dataset["prompt"] == [src.class_prompts[label] for label in src.dataset["label"]]
    assert len(set(src.dataset["label"])) > 5
    # a template replaces captions a folder carried, and the default template is the default caption
    for i in range(2):
        _write_png(tmp_path / f"{i}.png", value=30 * i)
    (tmp_path / "metadata.jsonl").write_text("\n".join(
        json.dumps({"file_name": f"{i}.png", "label": ["shoe", "ankle boot"][i], "prompt": "own"}) for i in range(2)))
    folder = load_source(f"imagefolder:{tmp_path}", prompt_template="a photo of {article} {class_name}")
    assert folder.dataset["prompt"] == ["a photo of a shoe", "a photo of an ankle boot"]
    assert load_source("mnist5k", limit=5).class_prompts == load_source("mnist5k", limit=5, prompt_template="a photo of {article} {class_name}").class_prompts


@pytest.mark.parametrize("template, match", [("a photo of {name}", r"unknown field\(s\) \['name'\]"),
                                             ("a photo of {class_name", "not a valid format string")])
def test_prompt_template_with_unknown_field_refused(template, match):
    with pytest.raises(DataError, match=match):
        load_source("mnist5k", limit=5, prompt_template=template)


def test_imagefolder_class_subfolders(tmp_path):
    for cls in ("cats", "dogs"):
        for i in range(3):
            _write_png(tmp_path / cls / f"{i}.png", value=40 * i + 10, size=(20 + i, 30), mode="RGB" if i else "L")
    src = load_source(f"imagefolder:{tmp_path}")
    assert src.class_names == ["cats", "dogs"]
    assert sorted(src.dataset["label"]) == [0, 0, 0, 1, 1, 1]
    assert set(src.dataset["prompt"]) == {"a photo of a cats", "a photo of a dogs"}


def test_imagefolder_metadata_prompts(tmp_path):
    for i in range(4):
        _write_png(tmp_path / f"{i}.png", value=30 * i)
    rows = [{"file_name": f"{i}.png", "label": ["shoe", "bag"][i % 2], "prompt": f"custom caption {i}"} for i in range(4)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = load_source(f"imagefolder:{tmp_path}")
    assert src.class_names == ["bag", "shoe"]
    assert src.dataset["prompt"] == [f"custom caption {i}" for i in range(4)]


def test_imagefolder_bad_files_named_or_skipped(tmp_path):
    _write_png(tmp_path / "a" / "good.png")
    _write_png(tmp_path / "b" / "good.png")
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png"):
        load_source(f"imagefolder:{tmp_path}")
    good = tmp_path / "b" / "good.png"
    (tmp_path / "b" / "truncated.png").write_bytes(good.read_bytes()[:40])
    (tmp_path / "a" / "empty.png").unlink()
    with pytest.raises(DataError, match="truncated.png"):
        load_source(f"imagefolder:{tmp_path}")
    src = load_source(f"imagefolder:{tmp_path}", skip_bad_files=True)
    assert len(src) == 2 and src.num_skipped == 1


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "holds no images"),
        (lambda p: _write_png(p / "loose.png"), "directly in"),
        (lambda p: (_write_png(p / "x.png"), (p / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "label": 3}))),
         "no class names"),
    ],
)
def test_imagefolder_clear_errors(tmp_path, setup, match):
    folder = tmp_path / "data"
    setup(folder)
    with pytest.raises(DataError, match=match):
        load_source(f"imagefolder:{folder}")


def test_unknown_split_and_limit():
    with pytest.raises(DataError, match="only a 'train' split"):
        load_source("mnist5k", "test")
    with pytest.raises(DataError, match="positive"):
        load_source("mnist5k", limit=0)
