"""The speed benchmark's statistics on constructed timings: interleaving, spreads, paired ratios, verdicts, and
the table that shows them; and the benchmark end to end at a tiny size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kdkit.bench.limits import parts_of
from kdkit.bench.speed import ratios
from kdkit.bench.timing import UNDECIDED, faster, interleaved, median_interval, paired_ratios, spread, verdict


def test_spread_is_the_median_with_quartiles_and_extremes() -> None:
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.low, s.high, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert spread([7.0]).to_dict() == {"median": 7.0, "q1": 7.0, "q3": 7.0, "low": 7.0, "high": 7.0, "n": 1,
                                       "ci_low": 7.0, "ci_high": 7.0, "coverage": 0.0}


def test_the_medians_interval_is_the_order_statistics_with_binomial_coverage() -> None:
    # n = 15: P(B <= 3) = 0.0176 for B ~ Binomial(15, 1/2), so the 4th smallest and 4th largest cover 96.5 %;
    # the 5th would cover only 1 - 2 P(B <= 4) = 88.2 %
    values = [float(v) for v in range(15, 0, -1)]
    low, high, coverage = median_interval(values)
    assert (low, high) == (4.0, 12.0) and coverage == pytest.approx(1 - 2 * 576 / 2**15)
    # fewer than 6 values: no pair reaches 95 %, the extremes are given with their coverage 1 - 2 / 2^n
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, pytest.approx(1 - 2 / 32))
    # more rounds narrow the interval; the interquartile range (the spread of single rounds) does not
    wide, narrow = spread([1.0, 2.0, 3.0, 4.0, 5.0, 6.0] * 2), spread([1.0, 2.0, 3.0, 4.0, 5.0, 6.0] * 20)
    assert narrow.ci_high - narrow.ci_low < wide.ci_high - wide.ci_low


@pytest.mark.parametrize(("kdkit_ms", "loop_ms", "call"), [
    # every round's ratio at or below 1.03: met, even though one round of each is slow (paired, it cancels)
    ([70.0, 71.0, 90.0, 70.5, 71.5], [69.0, 70.0, 88.0, 70.0, 70.5], "met"),
    # every round above: missed
    ([76.0, 77.0, 76.5, 95.0, 77.5], [70.0, 70.0, 70.0, 88.0, 70.0], "missed"),
    # the rounds straddle 1.03 (1.00 .. 1.06): neither is claimed
    ([70.0, 72.1, 74.2, 71.4, 73.5], [70.0, 70.0, 70.0, 70.0, 70.0], UNDECIDED),
])
def test_a_target_is_met_or_missed_only_when_the_spread_is_on_one_side(kdkit_ms: list[float], loop_ms: list[float],
                                                                       call: str) -> None:
    assert verdict(spread(paired_ratios(kdkit_ms, loop_ms)), 1.03) == call


def test_pairing_by_round_cancels_drift_that_medians_of_rows_do_not() -> None:
    # the machine slows down 20% halfway; kdkit is 2% slower than the loop in every round
    loop = [50.0, 50.0, 50.0, 60.0, 60.0, 60.0]
    kdkit = [v * 1.02 for v in loop]
    ratio = spread(paired_ratios(kdkit, loop))
    assert ratio.ci_low == ratio.ci_high == pytest.approx(1.02) and verdict(ratio, 1.03) == "met"
    with pytest.raises(ValueError, match="pair the same rounds"):
        paired_ratios(kdkit, loop[:-1])


def test_faster_names_the_side_only_when_the_spread_allows() -> None:
    assert faster(spread([0.8, 0.9, 0.95])) == "a" and faster(spread([1.05, 1.2, 1.1])) == "b"
    assert faster(spread([0.95, 1.0, 1.05])) == UNDECIDED


def test_blocks_are_interleaved_with_the_order_rotated_each_round() -> None:
    ran: list[str] = []
    now = [0.0]
    cost = {"a": 0.010, "b": 0.020, "c": 0.040}  # seconds per step, read by the fake clock

    def variant(name: str) -> Any:
        def step() -> None:
            ran.append(name)
            now[0] += cost[name]
        return step

    times = interleaved({n: variant(n) for n in cost}, steps=2, rounds=3, warmup=1, clock=lambda: now[0])
    assert ran[:3] == ["a", "b", "c"]  # one warm-up step each
    blocks = ran[3:][::2]  # each block is 2 steps of one variant
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert times == {n: [pytest.approx(1000 * c)] * 3 for n, c in cost.items()}  # ms per step, one per round


def test_ratios_pick_the_faster_layout_and_decline_the_bf16_target_without_native_bf16() -> None:
    times = {"b_kd_channels_last": [70.0, 71.0, 70.0], "c_kdkit_kd": [71.0, 72.0, 71.0],
             "c_kdkit_kd_bf16": [300.0, 310.0, 305.0]}
    found = ratios(times, {"b": "b_kd_channels_last"}, native_bf16=False)
    assert found["c/b"]["denominator"] == "b_kd_channels_last" and found["c/b"]["verdict"] == "met"
    assert found["c_bf16/b"]["verdict"].startswith("not applicable: no native bf16")
    assert found["c_bf16/c"]["verdict"] == "fp32 faster" and "d/a" not in found  # no cached step ran
    native = ratios({**times, "c_kdkit_kd_bf16": [50.0, 51.0, 50.0]}, {"b": "b_kd_channels_last"}, native_bf16=True)
    assert native["c_bf16/b"]["verdict"] == "met" and native["c_bf16/c"]["verdict"] == "bf16 faster"


def test_the_dominant_part_of_a_step_is_the_one_with_the_most_time() -> None:
    parts = parts_of({"kdkit.teacher": 30.0, "kdkit.backward": 50.0, "kdkit.loader": 20.0},
                     {"aten::convolution": 40.0, "aten::add": 1.0})
    assert parts["dominant"] == "backward" and parts["shares"]["teacher"] == pytest.approx(0.3)
    assert list(parts["top_ops_self_ms"]) == ["aten::convolution", "aten::add"]


@pytest.mark.slow
def test_bench_speed_end_to_end_at_a_tiny_size(tmp_path: Path, tiny_kd: dict) -> None:
    import yaml

    from kdkit.bench.speed import run_speed_bench

    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(tiny_kd))
    result = run_speed_bench(str(path), tmp_path / "speed", steps=2, rounds=3, warmup=1, profile_steps=2)
    assert set(result["rows"]) == {"a_ce_contiguous", "a_ce_channels_last", "b_kd_contiguous", "b_kd_channels_last",
                                   "c_kdkit_kd", "d_kdkit_kd_cached", "c_kdkit_kd_bf16", "d_kdkit_kd_cached_bf16",
                                   "loader"}
    assert all(len(blocks) == 3 for blocks in result["block_ms"].values())
    assert result["reference"]["b"] in ("b_kd_contiguous", "b_kd_channels_last")
    assert set(result["ratios"]) == {"c/b", "d/a", "c_bf16/b", "c_bf16/c", "d_bf16/d"}
    limits = result["limits"]["rows"]
    assert limits["student_train"]["flops"] > 0 and limits["teacher_forward"]["flops"] > 0
    assert 0 < limits["student_train"]["fraction_of_peak"] < 1 and "teacher_forward_bf16" in limits
    assert result["profile"]["dominant"] in ("teacher", "student", "objective", "backward", "optimizer", "loader")
    assert "self CPU time" in (tmp_path / "speed" / "profile.txt").read_text()
    text = (tmp_path / "speed" / "results.md").read_text()
    assert "| c/b: kdkit KD step / best hand-written KD loop |" in text and "How far from the limit: peak" in text
    assert json.loads((tmp_path / "speed" / "speed.json").read_text())["rounds"] == 3


def test_the_hand_written_loop_fetches_from_the_loader_and_steps_the_schedule(
        tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from kdkit.bench import speed
    from kdkit.data.loader import BatchLoader
    from kdkit.models import build_model
    from kdkit.recipe import recipe_from_dict
    from kdkit.schedule import lr_factor

    schedules = []

    def recorded(*args: Any) -> Any:
        schedules.append(speed.build_schedule.__wrapped__(*args))  # type: ignore[attr-defined]
        return schedules[-1]

    recorded.__wrapped__ = speed.build_schedule  # type: ignore[attr-defined]
    monkeypatch.setattr(speed, "build_schedule", recorded)
    recipe = recipe_from_dict(tiny)  # cosine schedule with 5 warm-up steps
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    loader = BatchLoader(images, torch.arange(64) % 10, batch_size=32, mean=[0.5], std=[0.25])
    fetched = []
    original = loader.epoch

    def counted(epoch: int, start: int = 0) -> Any:
        fetched.append(epoch)
        return original(epoch, start)

    loader.epoch = counted  # type: ignore[method-assign]
    class CrossEntropy:  # the task part the loop uses: the batch's targets and the supervised loss
        def targets(self, labels: torch.Tensor, index: torch.Tensor, split: str) -> torch.Tensor:
            return labels

        def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits, targets)

    step = speed.plain_ce_step(build_model("cnn_student", num_classes=10, in_channels=1, image_size=8), recipe, loader,
                               CrossEntropy())  # type: ignore[arg-type]
    for _ in range(3):  # 2 batches per epoch: the third comes from the next epoch
        step()
    assert fetched == [0, 1]
    factor = lr_factor(3, recipe.train.schedule, 0.05, steps_per_epoch=2, total_steps=2 * recipe.train.epochs)
    assert schedules[0].last_epoch == 3 and schedules[0].get_last_lr()[0] == pytest.approx(0.05 * factor)


def test_the_hand_written_distillation_loop_takes_kdkits_step_on_the_same_batch(tiny_kd: dict,
                                                                               tmp_path: Path) -> None:
    import copy

    import torch

    from kdkit.assemble import assemble
    from kdkit.bench import speed
    from kdkit.recipe import recipe_from_dict

    # two terms, one through a bridge onto a feature tap: the loop must reproduce taps, bridge, losses and weights
    tiny_kd["distill"] = [{"loss": "kd", "weight": 0.5, "temperature": 2.0},
                          {"loss": "mse", "student": "stage2", "teacher": "stage2", "bridge": "conv1x1",
                           "weight": 3.0}]
    run = assemble(recipe_from_dict(tiny_kd, [f"output.dir={tmp_path / 'run'}"]))
    assert speed.hand_writable(run) is None
    before = copy.deepcopy(run.built.student.model.state_dict())
    student = speed.hookless(run.built.student.model)
    speed.plain_terms_step(student, speed.hookless(run.built.teacher.model), run, "contiguous")()
    speed.kdkit_step(run)()  # kdkit's engine on the same first batch of the same loader
    ours = dict(run.built.student.model.named_parameters())
    for name, value in student.named_parameters():
        assert not torch.equal(value, before[name]), name  # the step moved it
        assert torch.allclose(value, ours[name], atol=1e-6, rtol=1e-5), name
