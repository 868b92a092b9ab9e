"""The data path at real size: a source holds paths (or stored bytes), never decoded images, so what it
costs in memory does not grow with the number or size of the images; every image is still checked up
front, a corrupt one named before any training."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dpdiff.data import load_source
from dpdiff.errors import DataError


def write_jpegs(root, n, size=512, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(root / f"{i:04d}.jpg", quality=90)
        rows.append({"file_name": f"{i:04d}.jpg", "text": f"caption {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_an_imagefolder_source_holds_paths_and_decodes_on_read(tmp_path):
    from datasets import Image as ImageFeature

    src = load_source(f"imagefolder:{write_jpegs(tmp_path / 'data', 40)}")
    assert isinstance(src.dataset.features["image"], ImageFeature)
    assert src.dataset.data.nbytes < 40 * 200  # paths and captions, not 40 decoded 512-px images (31 MB)
    assert src.dataset[3]["image"].size == (512, 512) and src.dataset[3]["prompt"] == "caption 3"
    assert src.identity.startswith("files:40:")


def _peak_rss_mb(folder) -> float:
    code = ("import resource, sys; from dpdiff.data import load_source; "
            f"s = load_source('imagefolder:{folder}'); assert len(s) > 0; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def test_checking_every_image_does_not_keep_them(tmp_path):
    """Loading 320 512-px images peaks where loading 20 does (keeping them decoded would add ~240 MB)."""
    few = _peak_rss_mb(write_jpegs(tmp_path / "few", 20))
    many = _peak_rss_mb(write_jpegs(tmp_path / "many", 320, seed=1))
    assert many - few < 60, (few, many)


def test_a_corrupt_file_is_named_before_training_among_many(tmp_path):
    root = write_jpegs(tmp_path / "data", 300, size=64)
    good = (root / "0150.jpg").read_bytes()
    (root / "0150.jpg").write_bytes(good[: len(good) // 3])
    with pytest.raises(DataError, match=r"0150\.jpg.*--skip_bad_files"):
        load_source(f"imagefolder:{root}")
    src = load_source(f"imagefolder:{root}", skip_bad_files=True)
    assert len(src) == 299 and src.num_skipped == 1 and "caption 150" not in list(src.dataset["prompt"])


def test_a_datasets_folder_stays_on_disk_and_is_checked(tmp_path):
    from datasets import Dataset, Features, Image as ImageFeature, Value

    root = write_jpegs(tmp_path / "jpegs", 12, size=64)
    files = sorted(str(p) for p in root.glob("*.jpg"))
    ds = Dataset.from_dict({"picture": files, "description": [f"d {i}" for i in range(12)]},
                           features=Features({"picture": ImageFeature(), "description": Value("string")}))
    ds.save_to_disk(tmp_path / "saved")
    src = load_source(str(tmp_path / "saved"), image_column="picture", caption_column="description")
    assert isinstance(src.dataset.features["image"], ImageFeature) and len(src) == 12
    assert src.dataset[5]["image"].size == (64, 64) and src.dataset[5]["prompt"] == "d 5"
    images = [{"bytes": open(f, "rb").read(), "path": None} for f in files]
    images[7] = {"bytes": b"not a jpeg", "path": None}  # save_to_disk embeds the bytes: corrupt them there
    Dataset.from_dict({"picture": images, "description": [f"d {i}" for i in range(12)]},
                      features=Features({"picture": ImageFeature(), "description": Value("string")})).save_to_disk(tmp_path / "bad")
    with pytest.raises(DataError, match="row 7 does not decode"):
        load_source(str(tmp_path / "bad"), image_column="picture", caption_column="description")


def test_the_loaders_do_not_import_each_other():
    """external (user data) builds on image_source, never on sources (the offline sets), which may fall back to
    external for the hub copy of Fashion-MNIST: one direction, no cycle."""
    import ast
    from pathlib import Path

    import dpdiff.data

    def imports(name):
        tree = ast.parse((Path(dpdiff.data.__file__).parent / f"{name}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert "dpdiff.data.sources" not in imports("external")
    assert "dpdiff.data.external" not in imports("image_source") and "dpdiff.data.sources" not in imports("image_source")
