"""`dpdiff evaluate` end to end on the formats `dpdiff sample` writes (image folder with
metadata.jsonl, save_to_disk dataset), with real Fashion-MNIST images standing in for samples."""

import json

import pytest
from PIL import Image

from dpdiff.cli import main
from dpdiff.data import load_source
from dpdiff.errors import DataError
from dpdiff.evaluation.synthetic import load_synthetic, map_labels
from dpdiff.io import write_json
from dpdiff.sampling.generate import encode_png, write_datasets, write_imagefolder

NUM_SYNTHETIC = 600
QUICK = ["--real", "fashion_mnist", "--real_limit", "400", "--epochs", "5"]


@pytest.fixture(scope="module")
def stand_in():
    """Fashion-MNIST train images as 32x32 RGB PNGs, like the tiny pipeline's samples."""
    src = load_source("fashion_mnist", split="train", limit=NUM_SYNTHETIC, seed=1)
    pngs = [encode_png(im.convert("RGB").resize((32, 32), Image.BICUBIC)) for im in src.dataset["image"]]
    return pngs, list(src.dataset["label"]), src.class_names


def write_folder(root, pngs, labels, names):
    write_imagefolder(root, iter(pngs), labels, [f"p{l}" for l in labels])
    write_json(root / "sampling.json", {"class_names": names})  # what `dpdiff sample` writes beside it
    return root


def test_imagefolder_end_to_end_with_fd(tmp_path, stand_in, capsys):
    pngs, labels, names = stand_in
    folder = write_folder(tmp_path / "samples", pngs, labels, names)
    out = tmp_path / "results.json"
    rc = main(["evaluate", *QUICK, "--synthetic", str(folder), "--metrics", "fd,logreg,mlp",
               "--num-fd-samples", "100", "--fd_input_size", "64", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    assert results["num_synthetic"] == NUM_SYNTHETIC and results["num_real"] == 400
    assert results["fd"]["description"] == "FD (EfficientNet-Lite0), 100 real (test) vs 100 synthetic, 28x28 grey -> 64 bilinear"
    assert results["fd"]["value"] > 0
    for model in ("logreg", "mlp"):
        # real images as "synthetic": far above the 0.10 of chance
        assert results["downstream"][model]["accuracy"] > 0.6
    assert "cnn" not in results["downstream"]
    printed = capsys.readouterr().out
    assert "FD (EfficientNet-Lite0), 100 real" in printed and "Ankle boot" in printed and "FID" not in printed


def test_real_fd_statistics_are_cached_and_never_reused_for_other_settings(tmp_path, stand_in, capsys):
    """--fd_real_stats: the second run reuses the real side (same FD to the last digit); a run of other
    settings is refused before any work instead of scoring against the wrong reference."""
    pngs, labels, names = stand_in
    folder = write_folder(tmp_path / "samples", pngs, labels, names)
    stats, out = tmp_path / "cache" / "real.npz", tmp_path / "r.json"
    argv = ["evaluate", *QUICK, "--synthetic", str(folder), "--metrics", "fd", "--num_fd_samples", "60",
            "--fd_input_size", "64", "--fd_real_stats", str(stats), "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    first = json.loads(out.read_text())["fd"]
    assert first["real_statistics"] == {"file": str(stats), "reused": False} and stats.exists()
    assert [p.name for p in stats.parent.iterdir()] == ["real.npz"]  # written atomically, no temporary left
    assert main(argv) == 0, capsys.readouterr().err
    second = json.loads(out.read_text())["fd"]
    assert second["real_statistics"]["reused"] is True and second["value"] == first["value"]

    out.unlink()
    capsys.readouterr()
    assert main([*argv[:-2], "--fd_input_size", "96", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "input_size: saved 64, now 96" in err and "Traceback" not in err
    assert not out.exists()


def test_saved_dataset_with_classes_in_another_order_is_matched_by_name(tmp_path, stand_in, capsys):
    pngs, labels, names = stand_in
    reordered = names[::-1]  # synthetic label k means reordered[k]
    relabelled = [reordered.index(names[l]) for l in labels]
    write_datasets(tmp_path / "ds", iter(pngs), relabelled, [""] * len(pngs), reordered)
    out = tmp_path / "r.json"
    rc = main(["evaluate", *QUICK, "--synthetic", str(tmp_path / "ds"), "--metrics", "logreg", "--repeats", "2", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    # a label mix-up would score near 0; matching by name keeps the real-data accuracy
    assert results["downstream"]["logreg"]["accuracy"] > 0.6
    assert results["downstream"]["train_count_per_class"] == {n: labels.count(k) for k, n in enumerate(names)}
    # --repeats: the mean of two seeded classifiers, their spread printed under it
    logreg = results["downstream"]["logreg"]
    assert logreg["repeats"] == 2 and logreg["accuracy"] == pytest.approx(sum(logreg["accuracy_runs"]) / 2)
    printed = capsys.readouterr().out
    assert "mean over 2 seeds of each classifier" in printed and f"{logreg['accuracy_std']:.4f}" in printed
    assert main(["evaluate", *QUICK, "--synthetic", str(tmp_path / "ds"), "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_label_outside_the_real_classes_is_one_clear_error(tmp_path, stand_in, capsys):
    pngs, labels, names = stand_in
    folder = write_folder(tmp_path / "s", pngs[:20], [9] * 10 + labels[10:20], names[:9] + ["Hat"])
    rc = main(["evaluate", *QUICK, "--synthetic", str(folder), "--metrics", "logreg"])
    err = capsys.readouterr().err
    assert rc == 2 and "['Hat']" in err and "not classes of the real set" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "case, expected",
    [("missing", "does not exist"), ("empty", "no lines"), ("metric", "unknown metric"), ("broken_png", "cannot read image"),
     ("inception", "pip install torchmetrics")],
)
def test_bad_input_exits_2_with_a_message(tmp_path, stand_in, capsys, case, expected):
    pngs, labels, names = stand_in
    metrics = "logreg"
    target = tmp_path / "s"
    if case == "missing":
        target = tmp_path / "nowhere"
    elif case == "empty":
        (target / "train").mkdir(parents=True)
        (target / "train" / "metadata.jsonl").write_text("\n")
    elif case == "metric":
        write_folder(target, pngs[:5], labels[:5], names)
        metrics = "logreg,fid"
    elif case == "inception":
        try:
            import torchmetrics  # noqa: F401

            pytest.skip("torchmetrics is installed here")
        except ImportError:
            pass
        metrics = "fid_inception"  # refused up front, before the (missing) folder is even looked at
        target = tmp_path / "nowhere"
    elif case == "broken_png":
        write_folder(target, pngs[:5], labels[:5], names)
        (target / "train" / "000002.png").write_bytes(pngs[2][:40])
    rc = main(["evaluate", *QUICK, "--synthetic", str(target), "--metrics", metrics])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err


def test_integer_labels_without_names_are_real_indices_and_checked():
    assert map_labels([0, 3, 9], None, [str(k) for k in range(10)], "x").tolist() == [0, 3, 9]
    with pytest.raises(DataError, match=r"labels \[10\] lie outside"):
        map_labels([0, 10], None, [str(k) for k in range(10)], "x")
    assert map_labels(["b", " A "], None, ["a", "b"], "x").tolist() == [1, 0]
    with pytest.raises(DataError, match="all integers or all class names"):
        map_labels([0, "a"], None, ["a", "b"], "x")


def test_class_subfolders_are_read(tmp_path, stand_in):
    pngs, _, names = stand_in
    for i, cls in enumerate(["Trouser", "Bag", "bag"]):  # folder names match case-insensitively
        (tmp_path / cls).mkdir()
        (tmp_path / cls / f"{i}.png").write_bytes(pngs[i])
    loaded = load_synthetic(str(tmp_path), names)
    assert sorted(loaded.labels.tolist()) == [1, 8, 8] and len(loaded) == 3
    (tmp_path / "Hat").mkdir()
    (tmp_path / "Hat" / "x.png").write_bytes(pngs[0])
    with pytest.raises(DataError, match="not classes of the real set"):
        load_synthetic(str(tmp_path), names)


def test_fd_decodes_only_its_subset_and_scores_what_the_whole_tensor_scores(tmp_path, stand_in, monkeypatch):
    """Memory flat in the set's size: the lazy sets decode a slice at a time, FD reads only its N images, and the
    statistics are those of the same images decoded up front (same preprocessing, same batches)."""
    import torch

    from dpdiff.evaluation.frechet import feature_statistics
    from dpdiff.data.image_sets import ImageTensors
    from dpdiff.features import load_feature_extractor

    pngs, labels, names = stand_in
    folder = write_folder(tmp_path / "samples", pngs[:200], labels[:200], names)
    synthetic = load_synthetic(str(folder), names)
    assert not isinstance(synthetic.images, list)  # paths, decoded when read

    reads = []

    class Counting:
        def __len__(self):
            return len(synthetic.images)

        def __getitem__(self, i):
            reads.append(int(i))
            return synthetic.images[i]

    lazy = ImageTensors(Counting(), 28, 1)
    picked = torch.randperm(len(lazy), generator=torch.Generator().manual_seed(0))[:40]
    extractor = load_feature_extractor("efficientnet_lite0", input_size=32, batch_size=16)
    mu, sigma = feature_statistics(lazy[picked], extractor, batch_size=16)
    assert sorted(reads) == sorted(picked.tolist())  # 40 of 200 decoded, each once
    whole = lazy.tensor()
    assert torch.equal(lazy[3], whole[3]) and torch.equal(lazy[-1], whole[-1])  # a row, like a tensor's
    mu_full, sigma_full = feature_statistics(whole[picked], extractor, batch_size=16)
    assert (mu == mu_full).all() and (sigma == sigma_full).all()


def test_classifiers_that_would_not_fit_in_memory_are_refused_before_any_work(tmp_path, stand_in, monkeypatch, capsys):
    import dpdiff.evaluation.classifiers as classifiers
    import dpdiff.training.memory_plan as memory_plan

    pngs, labels, names = stand_in
    folder = write_folder(tmp_path / "samples", pngs[:100], labels[:100], names)
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device: 1_000_000)  # 1 MB free: 500 images need 1.6
    monkeypatch.setattr(classifiers, "evaluate_downstream", lambda *a, **k: pytest.fail("trained before the check"))
    rc = main(["evaluate", *QUICK, "--synthetic", str(folder), "--metrics", "cnn", "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "--metrics fd" in err and "GiB" in err
    assert not (tmp_path / "r.json").exists()
