"""Small HTML pieces shared by the report and the methods' report sections."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path


def embed_png(file: Path) -> str:
    """An ``<img>`` element holding the PNG ``file`` inline (the report is one self-contained page)."""
    data = base64.b64encode(file.read_bytes()).decode()
    return f'<img alt="{html.escape(file.stem)}" src="data:image/png;base64,{data}">'


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A ``<table>`` of plain-text cells (escaped here): one header row, then ``rows``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
