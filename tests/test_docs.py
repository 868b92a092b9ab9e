"""The docs that users follow must stay true: every recipe flag is documented, the README starts
with the two set-up commands, and the recipes stay thin."""

from __future__ import annotations

import argparse
from pathlib import Path

from dpdiff.training.arguments import add_finetune_arguments

ROOT = Path(__file__).resolve().parent.parent


def test_every_finetune_flag_is_documented():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    parser = add_finetune_arguments(argparse.ArgumentParser())
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"]
    missing = [f for f in flags if f"`{f}`" not in doc]
    assert not missing, f"document these flags in docs/recipes.md: {missing}"


def test_readme_starts_with_the_two_commands():
    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if l.strip()]
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("make demo") and block[1].startswith("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert "recipes/finetune_lora.py" in makefile.split("demo:")[1].split("\n\n")[0]


def test_recipes_are_thin():
    for recipe in (ROOT / "recipes").glob("*.py"):
        assert len(recipe.read_text().splitlines()) <= 150, f"{recipe.name}: move logic into the library"


def test_no_module_over_400_lines():
    long = [str(p.relative_to(ROOT)) for p in (ROOT / "dpdiff").rglob("*.py") if len(p.read_text().splitlines()) > 400]
    assert not long, f"split these modules: {long}"


def test_shipped_configs_parse_with_the_recipe_flags():
    from dpdiff.config import parse_with_config

    configs = {"finetune_lora.yaml": "lora", "finetune_attention.yaml": "attention", "finetune_lora_fashion_mnist.yaml": "lora"}
    assert set(configs) == {p.name for p in (ROOT / "recipes" / "configs").glob("finetune_*.yaml")}
    for name, method in configs.items():
        parser = add_finetune_arguments(argparse.ArgumentParser(), method=method)
        args = parse_with_config(parser, ["--config", str(ROOT / "recipes" / "configs" / name), "--seed", "5"])
        assert args.method == method and args.seed == 5 and args.target_epsilon == 10.0
