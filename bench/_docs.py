"""Benchmarks write their measured section of a docs page between markers, leaving the other sections alone."""

from __future__ import annotations

import json
from pathlib import Path

from alnus._io import atomic_write_text


def write_section(path: Path, name: str, section: str, *, title: str = "# Performance") -> None:
    """Replace (or append) the text between `<!-- name:start -->` and `<!-- name:end -->` in `path`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{section.strip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else f"{title}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, text)


def publish(record: Path, result: dict, docs: Path, name: str, section: str) -> None:
    """A bench's measurement: its record as JSON at `record`, its section `name` in the docs page `docs` (Results),
    and the section on stdout."""
    atomic_write_text(record, json.dumps(result, indent=2, default=float) + "\n")
    write_section(docs, name, section, title="# Results")
    print(section)
