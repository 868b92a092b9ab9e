"""benchmarks/family_params.py: its counts on real denoiser shapes agree with plain arithmetic on the
meta model, and docs/recipes.md holds what it generates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("sd-1.5", "dit-xl-2-256")  # the quick ones; the docs hold all seven


def _load():
    spec = importlib.util.spec_from_file_location("family_params", ROOT / "benchmarks" / "family_params.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("family_params", module)
    spec.loader.exec_module(module)
    return module


fp = _load()


@pytest.fixture(scope="module")
def rows():
    return {key: fp.count(key) for key in CHECKED}


def _expected(key: str, rank: int = fp.RANK) -> dict:
    """The same quantities from the meta model alone, without prepare_trainable."""
    model = fp.build(fp.MODELS[key])
    total = sum(p.numel() for p in model.parameters())
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora = sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in targets))
    if key == "sd-1.5":  # the UNet's Transformer2DModel blocks
        blocks = [m for m in model.modules() if type(m).__name__ == "Transformer2DModel"]
    else:
        blocks = list(model.transformer_blocks)
    attention = sum(p.numel() for b in blocks for p in b.parameters())
    return {"total": total, "lora": lora, "attention": attention, "blocks": len(blocks)}


@pytest.mark.parametrize("key", CHECKED)
def test_counts_agree_with_arithmetic_on_the_meta_model(rows, key):
    row, expected = rows[key], _expected(key)
    assert row["total"] == expected["total"]
    assert row["full"][0] == expected["total"] and not row["left_frozen"]
    assert row["lora"][0] == expected["lora"] and not row["lora_analytic"]  # peft injected on meta
    assert row["lora"][1] == pytest.approx(expected["lora"] / (expected["total"] + expected["lora"]))
    assert row["attention"][0] == expected["attention"]
    assert row["blocks"] == expected["blocks"]
    assert fp.analytic_lora_params(fp.build(fp.MODELS[key]), row["targets"], fp.RANK) == expected["lora"]


def test_known_sizes(rows):
    assert rows["sd-1.5"]["total"] == 859_520_964  # the published SD-1.5 UNet
    assert rows["sd-1.5"]["blocks"] == 16 and rows["dit-xl-2-256"]["blocks"] == 28


def _docs_section() -> str:
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert text.count(fp.START) == 1 and text.count(fp.END) == 1
    section = text.split(fp.START)[1].split(fp.END)[0]
    assert "## Model families" in text.split(fp.START)[0]
    return section


def test_docs_hold_what_the_script_generates(rows):
    section = _docs_section()
    lines = set(section.splitlines())
    generated = fp.markdown([rows[k] for k in CHECKED])
    for line in generated.splitlines():
        if line.startswith("|"):
            assert line in lines, f"docs/recipes.md is stale; run benchmarks/family_params.py --write_docs:\n{line}"
    for model in fp.MODELS.values():  # every model has its rows
        assert sum(l.startswith(f"| {model.label} |") for l in lines) == 2, model.label


def test_write_docs_replaces_only_the_marked_section(tmp_path):
    doc = tmp_path / "recipes.md"
    doc.write_text(f"# a\n\nbefore\n\n{fp.START}\nold\n{fp.END}\n\nafter\n", encoding="utf-8")
    fp.write_docs("| new |", doc)
    assert doc.read_text(encoding="utf-8") == f"# a\n\nbefore\n\n{fp.docs_section('| new |')}\n\nafter\n"


def test_main_prints_the_table(capsys):
    table = fp.main(["--models", "dit-xl-2-256"])
    assert table in capsys.readouterr().out and "| DiT-XL/2-256 | `dit` |" in table
