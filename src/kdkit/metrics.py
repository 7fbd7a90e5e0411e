"""Per-epoch metrics written as CSV and JSON (atomically), optionally to TensorBoard too."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from kdkit.checkpoint import atomic_write_text


class MetricsLog:
    """Accumulates one row per epoch and rewrites ``metrics.csv`` / ``metrics.json`` after each.

    Rewriting the whole (small) file through an atomic rename means a crash never leaves a torn
    line, and a resumed run continues from the rows stored in its checkpoint: files left in the run folder
    are rewritten to those rows at once, dropping any row a crash wrote past the checkpoint.

    Args:
        run_dir: The run folder.
        rows: Rows restored from a checkpoint when resuming.
        tensorboard: Also write scalars with ``torch.utils.tensorboard`` (needs the tensorboard package).
    """

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]] | None = None, tensorboard: bool = False) -> None:
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = list(rows or [])
        if (run_dir / "metrics.json").exists() or (run_dir / "metrics.csv").exists():
            self.flush()  # epochs are logged before their checkpoint is written: a crash between leaves one more
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def append(self, row: dict[str, Any]) -> None:
        """Add an epoch row and persist everything."""
        self.rows.append(row)
        self.flush()
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key != "epoch":
                    self._tb.add_scalar(key, value, row["epoch"])
            self._tb.flush()

    def flush(self) -> None:
        """Write ``metrics.csv`` and ``metrics.json``."""
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        if columns:
            writer = csv.DictWriter(buffer, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        atomic_write_text(self.run_dir / "metrics.csv", buffer.getvalue())
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(self.rows, indent=1))

    def close(self) -> None:
        """Close the TensorBoard writer, if any."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a run folder."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())
