"""Progress: a live bar on a terminal; plain lines at a bounded rate when the output is a file or a pipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdkit
import kdkit.progress
from kdkit.data.loader import BatchLoader
from kdkit.engine import Engine
from kdkit.progress import PlainProgress, RichProgress, progress_bar


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_prints_at_a_bounded_rate(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    bar = PlainProgress("teacher", total=1000, completed=100, every=15.0, clock=clock)
    for step in range(101, 201):  # 100 updates within 12.5 s: too soon for a line
        clock.now += 0.125
        bar.update(step, "ep 1/2 loss 0.5")
    assert capsys.readouterr().out == ""
    clock.now += 2.5  # 15 s since the start: one line, with the position, the status and an eta
    bar.update(200, "ep 1/2 loss 0.5")
    bar.update(201, "ep 1/2 loss 0.5")
    lines = capsys.readouterr().out.splitlines()
    # 100 steps in 15 s (the 100 done before a resume do not count): 800 left take 2 min
    assert lines == ["teacher step 200/1000 (20%)  ep 1/2 loss 0.5  15s elapsed, eta 2m00s"]
    clock.now += 14.0
    bar.print("teacher epoch 1/2 ...")  # other output resets the wait: no line right after it
    clock.now += 14.0
    bar.update(300, "x")
    assert capsys.readouterr().out == "teacher epoch 1/2 ...\n"


def test_progress_bar_is_plain_off_a_terminal_and_rich_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not kdkit.progress.interactive()  # pytest captures standard output: not a terminal
    with progress_bar("run", 10) as bar:
        assert isinstance(bar, PlainProgress)
    monkeypatch.setattr(kdkit.progress, "interactive", lambda: True)
    with progress_bar("run", 10) as bar:
        assert isinstance(bar, RichProgress)


def test_training_off_a_terminal_reports_within_the_epoch(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(kdkit.progress, "PLAIN_EVERY_SECONDS", 0.0)  # every update prints
    torch.manual_seed(0)
    images = torch.randint(0, 256, (96, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(96) % 2
    norm = {"mean": (0.5,), "std": (0.25,)}
    train = BatchLoader(images, labels, batch_size=8, **norm)  # 12 steps; progress is updated every 10
    test = BatchLoader(images, labels, batch_size=96, shuffle=False, drop_last=False, **norm)
    engine = Engine(student=kdkit.Student(nn.Sequential(nn.Flatten(), nn.Linear(16, 2))), objective=kdkit.Objective(),
                    train_loader=train, eval_loader=test, epochs=1, progress=True, label="tiny",
                    make_optimizer=kdkit.optimizer_factory(kdkit.TrainSpec(epochs=1, batch_size=8)),
                    task=kdkit.TASKS.get("classification").bind(None, "cpu"))
    engine.fit()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny step 10/12 (83%)  ep 1/1 loss ") and "eta" in lines[0]  # within the epoch
    assert lines[1].startswith("tiny step 12/12 (100%)") and lines[2].startswith("tiny epoch 1/1")
