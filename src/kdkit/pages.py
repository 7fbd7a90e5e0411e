"""Small HTML pieces shared by the report and the methods' report sections."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def embed_png(file: Path) -> str:
    """An ``<img>`` element holding the PNG ``file`` inline (the report is one self-contained page)."""
    data = base64.b64encode(file.read_bytes()).decode()
    return f'<img alt="{html.escape(file.stem)}" src="data:image/png;base64,{data}">'
