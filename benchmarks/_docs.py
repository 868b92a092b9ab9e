"""Replace one `## section` of docs/benchmarks.md, leaving the other benchmarks' sections alone."""

from __future__ import annotations

import re
from pathlib import Path

from dpdiff.io import write_text

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery table here is written by a script in `benchmarks/`; rerun it to refresh its section.\n"


def update_section(heading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text(path, text.rstrip("\n") + "\n")
