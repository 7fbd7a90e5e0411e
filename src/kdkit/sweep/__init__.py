"""``kdkit sweep RECIPE SWEEP``: tune a recipe's keys with Optuna, each trial an ordinary run scored on a
validation split carved from the training set (:mod:`kdkit.sweep.space` reads the sweep file,
:mod:`kdkit.sweep.study` runs it, :mod:`kdkit.sweep.boss` is BOSS mode, :mod:`kdkit.sweep.output` writes
``sweep.json``, ``best.yaml`` and ``report.md``)."""

from kdkit.sweep.study import run_sweep

__all__ = ["run_sweep"]
