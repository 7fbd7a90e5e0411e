"""What the hardware can do: the precision ``train.amp: auto`` picks, the CPU's peak FLOP/s, and a teacher's
bf16 forward within its stated tolerance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kdkit import hardware
from kdkit.hardware import NO_BF16_UNIT, choose_amp, cpu_peak

CPU = torch.device("cpu")
ZEN3 = "fpu sse sse2 avx fma avx2 bmi2"
SKYLAKE_SP = f"{ZEN3} avx512f avx512bw avx512vl"
COOPER_LAKE = f"{SKYLAKE_SP} avx512_bf16"
SAPPHIRE_RAPIDS = f"{COOPER_LAKE} amx_tile amx_bf16 amx_int8"


def cpuinfo(flags: str, mhz: str = "2000.000", siblings: int = 2, cores: int = 2) -> str:
    """A /proc/cpuinfo text (the first CPU's lines are the ones read)."""
    return (f"processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: {mhz}\nsiblings\t: {siblings}\n"
            f"cpu cores\t: {cores}\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: other\n")


# -- train.amp: auto --------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "amp", "said"), [
    (SAPPHIRE_RAPIDS, "bf16", "AMX-BF16"), (COOPER_LAKE, "bf16", "AVX512-BF16"),
    (SKYLAKE_SP, "off", NO_BF16_UNIT), (ZEN3, "off", NO_BF16_UNIT), ("", "off", "flags are unknown")])
def test_auto_picks_bf16_on_cpus_with_native_bf16_only(flags: str, amp: str, said: str) -> None:
    choice = choose_amp("auto", CPU, flags=frozenset(flags.split()))
    assert (choice.requested, choice.amp) == ("auto", amp) and said in choice.reason
    shown = "bf16 autocast" if amp == "bf16" else "fp32"
    assert choice.describe().startswith(f"precision: {shown} (auto:")


@pytest.mark.parametrize(("native", "amp"), [(True, "bf16"), (False, "off")])
def test_auto_picks_bf16_on_gpus_with_native_bf16(native: bool, amp: str) -> None:
    choice = choose_amp("auto", torch.device("cuda"), cuda_bf16=native)
    assert choice.amp == amp and ("has native bf16" in choice.reason) is native


def test_auto_is_fp32_on_other_devices_and_explicit_modes_are_kept() -> None:
    assert choose_amp("auto", torch.device("mps")).amp == "off"
    amx = frozenset(SAPPHIRE_RAPIDS.split())
    assert choose_amp("off", CPU, flags=amx).amp == "off"  # off stays off on bf16 hardware
    slow = choose_amp("bf16", CPU, flags=frozenset(ZEN3.split()))
    assert slow.amp == "bf16" and "emulated and slower than fp32" in slow.reason
    assert choose_amp("bf16", CPU, flags=amx).reason == "train.amp: bf16"


def test_auto_reads_the_flags_of_proc_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "CPUINFO", fake)
    fake.write_text(cpuinfo(SAPPHIRE_RAPIDS))
    assert choose_amp("auto", CPU).amp == "bf16"
    fake.write_text(cpuinfo(ZEN3))
    assert choose_amp("auto", CPU).amp == "off"


def fake_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: str) -> None:
    fake = tmp_path / "cpuinfo"
    fake.write_text(cpuinfo(flags))
    monkeypatch.setattr(hardware, "CPUINFO", fake)


@pytest.mark.slow
def test_a_run_resolves_auto_for_its_device_and_the_engine_uses_the_choice(
        tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdkit.assemble import assemble
    from kdkit.build import plan
    from kdkit.recipe import recipe_from_dict

    recipe = recipe_from_dict(tiny, ["train.amp=auto"])
    fake_cpu(monkeypatch, tmp_path, SAPPHIRE_RAPIDS)
    assert plan(recipe, training=False).precision.amp == "bf16"
    assert assemble(recipe).engine.amp == "bf16"
    fake_cpu(monkeypatch, tmp_path, ZEN3)
    assert assemble(recipe).engine.amp == "off"


def test_the_digest_of_a_recipe_that_leaves_amp_unset_is_unchanged(tiny: dict[str, Any]) -> None:
    # `off` stays the default: recipes written before `auto` existed keep their digests and finished runs
    from kdkit.recipe import recipe_from_dict

    assert recipe_from_dict(tiny).train.amp == "off"
    assert recipe_from_dict(tiny).digest() == recipe_from_dict(tiny, ["train.amp=off"]).digest()
    assert recipe_from_dict(tiny).digest() != recipe_from_dict(tiny, ["train.amp=auto"]).digest()


@pytest.mark.slow
def test_a_run_prints_and_stores_its_precision_choice(tiny: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    fake_cpu(monkeypatch, tmp_path, ZEN3)
    summary = run_recipe(recipe_from_dict(tiny, ["train.amp=auto", "train.epochs=1"]))
    expected = {"requested": "auto", "amp": "off",
                "reason": f"auto: this CPU has {NO_BF16_UNIT} (bf16 would be emulated, slower), so fp32"}
    assert summary["amp"] == expected
    assert json.loads((Path(tiny["output"]["dir"]) / "summary.json").read_text())["amp"] == expected
    assert f"precision: fp32 ({expected['reason']})" in capsys.readouterr().out


# -- peak FLOP/s ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "fp32", "bf16"), [
    (ZEN3, 32, 32), (SKYLAKE_SP, 64, 64), (COOPER_LAKE, 64, 128), (SAPPHIRE_RAPIDS, 64, 1024),
    ("fpu sse sse2 avx", 16, 16), ("fpu sse sse2", 8, 8)])
def test_peak_is_cores_times_clock_times_flops_per_cycle_from_the_flags(flags: str, fp32: int, bf16: int) -> None:
    peak = cpu_peak(cpuinfo(flags, mhz="2500.000"), "", cpus=2)
    assert peak is not None and (peak.fp32_per_cycle, peak.bf16_per_cycle) == (fp32, bf16)
    assert peak.fp32 == pytest.approx(2 * 2.5e9 * fp32) and peak.bf16 == pytest.approx(2 * 2.5e9 * bf16)
    assert "cpu MHz" in peak.clock_source and f"{fp32} FLOP/cycle" in peak.describe()


def test_peak_prefers_the_cpufreq_maximum_and_counts_hyperthreads_once() -> None:
    peak = cpu_peak(cpuinfo(ZEN3, mhz="1500.000", siblings=4, cores=2), "3500000\n", cpus=4)
    assert peak is not None and peak.clock_ghz == 3.5 and "cpuinfo_max_freq" in peak.clock_source
    assert peak.cores == 2 and "2 hyperthreads per core" in peak.cores_note
    assert peak.fp32 == pytest.approx(2 * 3.5e9 * 32)


def test_no_peak_without_x86_flags() -> None:
    assert cpu_peak("processor\t: 0\nFeatures\t: fp asimd\n", "", cpus=4) is None


# -- the teacher's forward in bf16 ------------------------------------------------------------------

#: Stated tolerance of a teacher's bf16 forward against fp32: relative L2 error of the logits, and the largest
#: difference of the soft targets at temperature 4 (measured on this pair: 0.5-0.7 % and <= 0.004).
BF16_LOGITS_REL, BF16_SOFT_TARGETS_ABS = 0.02, 0.01


@pytest.mark.parametrize("seed", [0, 1])
def test_the_teachers_bf16_forward_stays_within_the_stated_tolerance(seed: int) -> None:
    from kdkit.distill import FrozenTeacher
    from kdkit.models import build_model

    torch.manual_seed(seed)
    model = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=28)
    with torch.no_grad():  # BatchNorm statistics of real data, and logits of a trained teacher's scale (std ~3.5)
        for _ in range(2):
            model(torch.randn(64, 1, 28, 28))
        model.fc.weight.mul_(100)
    teacher = FrozenTeacher(model, channels_last=True, fold_bn=True)  # as the engine runs it
    x = torch.randn(16, 1, 28, 28)
    exact = teacher(x)["logits"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Engine.autocast() of train.amp: bf16
        low = teacher(x)["logits"]
    assert low.dtype == torch.bfloat16 and exact.std() > 2
    assert (low.float() - exact).norm() / exact.norm() <= BF16_LOGITS_REL
    soft = (torch.softmax(low.float() / 4, 1) - torch.softmax(exact / 4, 1)).abs().max()
    assert soft <= BF16_SOFT_TARGETS_ABS
