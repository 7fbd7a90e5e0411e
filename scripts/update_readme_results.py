"""Paste a demo's results table into README.md between the results markers.

Usage: .venv/bin/python scripts/update_readme_results.py runs/demo/results.md "kdkit demo --seeds 3"
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    table = Path(sys.argv[1]).read_text().strip()
    command = sys.argv[2] if len(sys.argv) > 2 else "kdkit demo"
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split("<!-- results:begin -->", 1)
    _, tail = rest.split("<!-- results:end -->", 1)
    block = (f"Measured by `{command}` (regenerate the table with that command; it is printed by the demo "
             f"and saved in `runs/demo/results.md`):\n\n{table}\n")
    (ROOT / "README.md").write_text(f"{head}<!-- results:begin -->\n{block}<!-- results:end -->{tail}")


if __name__ == "__main__":
    main()
