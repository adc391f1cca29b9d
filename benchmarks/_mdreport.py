"""Shared by the benchmark scripts: write one script's section of ``docs/benchmarks.md``.

Each script owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; running it
replaces only that block (appending it the first time), so scripts can run in any order and alone.
"""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(name: str, title: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the ``name`` section of ``path`` with ``## title`` and ``body`` (creating the file if needed)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n## {title}\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
