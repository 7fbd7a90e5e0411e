"""Paste a results table into README.md between its markers.

Usage:
    .venv/bin/python scripts/update_readme_results.py runs/demo/results.md "kdkit demo"
    .venv/bin/python scripts/update_readme_results.py runs/bench_methods/results.md "kdkit bench methods" bench
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    table = Path(sys.argv[1]).read_text().strip()
    command = sys.argv[2] if len(sys.argv) > 2 else "kdkit demo"
    marker = sys.argv[3] if len(sys.argv) > 3 else "results"
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(f"<!-- {marker}:begin -->", 1)
    _, tail = rest.split(f"<!-- {marker}:end -->", 1)
    block = (f"Measured by `{command}` (regenerate the table with that command; it prints it and saves it "
             f"as `results.md` in its output folder):\n\n{table}\n")
    (ROOT / "README.md").write_text(f"{head}<!-- {marker}:begin -->\n{block}<!-- {marker}:end -->{tail}")


if __name__ == "__main__":
    main()
