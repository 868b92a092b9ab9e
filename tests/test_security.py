"""Security properties checked on the source and on a real run: no code-executing deserialisation,
no remote code, and nothing secret (hub token, training images, private captions) in what a run
writes or prints."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "dpdiff").rglob("*.py"), *(ROOT / "recipes").rglob("*.py")])
TOKEN = "hf_SECRETTESTTOKEN123"
SECRET_WORD = "xyzzyplughsecret"
GENERATED_IMAGES = {"samples.png", "epsilon_curve.png"}


def calls(text: str, name: str) -> list[str]:
    """The full text of every `name(...)` call (balanced parentheses, across lines)."""
    found = []
    for match in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 0, match.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        found.append(text[match.start() : i + 1])
    return found


def test_the_scan_sees_the_package():
    assert len(SOURCES) > 30 and ROOT / "dpdiff" / "training" / "checkpoint.py" in SOURCES
    assert calls("x = torch.load(\n  p,\n  weights_only=(True))", "torch.load") == ["torch.load(\n  p,\n  weights_only=(True))"]


def test_every_torch_load_is_weights_only():
    offenders, seen = [], 0
    for path in SOURCES:
        for call in calls(path.read_text(encoding="utf-8"), "torch.load"):
            seen += 1
            if not re.search(r"weights_only\s*=\s*True\b", call):
                offenders.append(f"{path.relative_to(ROOT)}: {call}")
    assert seen >= 1  # checkpoint.py loads its state this way
    assert not offenders, offenders


def test_no_remote_code_is_trusted():
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if re.search(r"trust_remote_code\s*=\s*True", p.read_text(encoding="utf-8"))]
    assert not offenders


def test_pickle_only_in_the_numpy_only_unpickler():
    pattern = re.compile(r"\bpickle\.(load|loads|Unpickler)\b|allow_pickle\s*=\s*True|\b(dill|joblib|cloudpickle)\b")
    hits = {}
    for path in SOURCES:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                hits.setdefault(path.relative_to(ROOT).as_posix(), []).append((lineno, line.strip()))
    assert set(hits) <= {"dpdiff/data/sources.py"}, hits
    # there, the one unpickler refuses everything but numpy's array rebuild
    from dpdiff.data.sources import _NumpyOnlyUnpickler

    assert all(module.startswith("numpy") for module, _ in _NumpyOnlyUnpickler.ALLOWED)
    assert all("_NumpyOnlyUnpickler" in line for _, line in hits.get("dpdiff/data/sources.py", []))


def test_numpy_only_unpickler_refuses_code():
    import io
    import os
    import pickle

    from dpdiff.data.sources import _NumpyOnlyUnpickler

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    array = np.arange(6).reshape(2, 3)
    assert np.array_equal(_NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(array))).load(), array)


@pytest.fixture(scope="module")
def private_folder(tmp_path_factory) -> Path:
    """Two public class names; every image's caption carries a private word that is not a class name."""
    root = tmp_path_factory.mktemp("private") / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(16):
        label = ("boots", "hats")[i % 2]
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "label": label, "prompt": f"{label} owned by {SECRET_WORD} {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(f"{record.getMessage()} {record.args!r}")


@pytest.fixture(scope="module")
def secret_run(tiny_pipeline_dir, private_folder, tmp_path_factory):
    """A small run given a hub token (no push) on the private folder: (output dir, everything it
    printed to stdout/stderr, every log record at DEBUG)."""
    import contextlib
    import io

    from dpdiff.training.arguments import add_finetune_arguments
    from dpdiff.training.loop import finetune

    out = tmp_path_factory.mktemp("runs") / "run"
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--output_dir", str(out),
            "--dataset", f"imagefolder:{private_folder}", "--batch_size", "8", "--physical_batch_size", "8",
            "--max_steps", "3", "--checkpointing_steps", "2", "--delta", "1e-3", "--target_epsilon", "8",
            "--num_inference_steps", "1", "--hub_token", TOKEN, "--privacy_seed", "1"]
    args = add_finetune_arguments(argparse.ArgumentParser()).parse_args(argv)
    handler, root = _Collect(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    stream = io.StringIO()
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            finetune(args)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return out, stream.getvalue(), "\n".join(handler.lines)


def test_token_and_private_captions_never_leave_the_run(secret_run):
    out, printed, logged = secret_run
    assert (out / "README.md").is_file() and (out / "privacy.json").is_file() and (out / "checkpoints").is_dir()
    assert "DP lora" in printed  # the capture saw the progress bar
    for secret in (TOKEN, SECRET_WORD):
        assert secret not in printed and secret not in logged
        leaking = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaking, f"{secret} found in {leaking}"
    # the generation config and the card name the public class names, never a private caption
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["class_names"] == ["boots", "hats"]
    assert "boots" in (out / "README.md").read_text()


def test_no_training_image_in_the_output(secret_run):
    out = secret_run[0]
    images = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}}
    assert images == GENERATED_IMAGES  # the synthetic grid and the epsilon plot, nothing else
    card = (out / "README.md").read_text()
    assert "data:image" not in card  # no inlined picture either
