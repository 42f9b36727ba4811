"""Refresh the tables pasted in docs/results.md from the harness's table.md files.

    python benchmarks/reproduce_doc_tables.py

Each ``<!-- tables: results/X/table.md -->`` ... ``<!-- /tables -->`` block in
docs/results.md is replaced by the per-N summary tables (mean ± std) of that
file, so the prose and the CSVs cannot drift apart after a resumed sweep.
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"(<!-- tables: (\S+) -->\n).*?(<!-- /tables -->)", re.S)
#: ``<!-- file: results/X/best.md -->`` ... ``<!-- /file -->``: the file pasted verbatim (best.md, diagnosis.md)
FILE = re.compile(r"(<!-- file: (\S+) -->\n).*?(<!-- /file -->)", re.S)


def summary_tables(table_md: Path) -> str:
    """The 'Algorithm | N=1 | N=2 ...' table of every schedule section, under its heading."""
    if not table_md.exists():
        return "(not run yet)\n"
    parts = []
    for section in table_md.read_text().split("### ")[1:]:
        title = section.splitlines()[0].strip()
        pivot = section[section.index("\n| Algorithm |") + 1 :].strip()
        parts.append(f"**{title}**\n\n{pivot}\n")
    return "\n".join(parts)


def refresh(doc: Path = DOCS / "results.md") -> None:
    text = BLOCK.sub(lambda m: m.group(1) + summary_tables(DOCS / m.group(2)) + m.group(3), doc.read_text())
    text = FILE.sub(lambda m: m.group(1) + verbatim(DOCS / m.group(2)) + m.group(3), text)
    doc.write_text(text)


def verbatim(path: Path) -> str:
    return path.read_text().rstrip("\n") + "\n" if path.exists() else "(not run yet)\n"


if __name__ == "__main__":
    refresh()
