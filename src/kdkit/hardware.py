"""What this machine's arithmetic units can do: native bf16, peak FLOP/s, and the precision ``train.amp: auto`` picks.

CPU features come from the kernel's ``/proc/cpuinfo`` flags (Linux). ``torch.backends.cpu.get_cpu_capability()``
cannot decide: it reports ``AVX512`` alike for CPUs whose bf16 is native (AVX512-BF16, AMX-BF16) and for older
AVX-512 CPUs where oneDNN emulates bf16, slower than fp32. torch's cpuinfo queries
(``torch.cpu._is_amx_tile_supported``) answer exactly but are private. The flags are public, are the string the
peak FLOP/s estimate reads too, and make every decision here a pure function of a given string (tested without the
hardware). Without ``/proc/cpuinfo`` (macOS, Windows) no flag is known: ``auto`` picks fp32 and says why.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")
#: The highest clock the kernel's frequency driver allows (kHz); absent in many VMs.
CPUFREQ_MAX = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")

#: Native bf16 units by the cpuinfo flag that announces them, fastest first.
BF16_UNITS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}
NO_BF16_UNIT = "no AMX/AVX512-BF16"


def read_text(path: Path) -> str:
    """The file's text, or ``""`` when it cannot be read (not Linux, no cpufreq driver)."""
    try:
        return path.read_text()
    except OSError:
        return ""


def cpuinfo_field(cpuinfo: str, name: str) -> str | None:
    """The value of the first ``name : value`` line of ``/proc/cpuinfo`` text (the first CPU's)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The first CPU's feature flags (x86 ``flags``), empty when unknown."""
    return frozenset((cpuinfo_field(cpuinfo, "flags") or "").split())


def native_bf16_unit(flags: frozenset[str]) -> str | None:
    """The fastest native bf16 unit the flags announce (``AMX-BF16``, ``AVX512-BF16``), or ``None``."""
    return next((unit for flag, unit in BF16_UNITS.items() if flag in flags), None)


@dataclass(frozen=True)
class Precision:
    """The autocast mode a run uses and why (printed at run start, stored in ``summary.json``).

    Attributes:
        requested: ``train.amp`` as the recipe gives it (``auto``, ``off``, ``bf16``, ``fp16``).
        amp: The mode the engine uses: ``off`` (fp32), ``bf16`` or ``fp16``.
        reason: One sentence: why this mode.
    """

    requested: str
    amp: str
    reason: str

    def describe(self) -> str:
        """``precision: bf16 autocast (auto: this CPU has AMX-BF16)``."""
        what = "fp32" if self.amp == "off" else f"{self.amp} autocast"
        return f"precision: {what} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``summary.json``."""
        return asdict(self)


def choose_amp(requested: str, device: torch.device, *, flags: frozenset[str] | None = None,
               cuda_bf16: bool | None = None) -> Precision:
    """Resolve ``train.amp``: ``auto`` is bf16 where the hardware computes it natively, fp32 elsewhere.

    Native bf16: a CPU with AMX-BF16 or AVX512-BF16, a CUDA GPU with bf16 arithmetic (Ampere and later;
    ``torch.cuda.is_bf16_supported(including_emulation=False)``). Elsewhere bf16 is emulated and slower than fp32.
    An explicit mode is kept; bf16 on a CPU without a native unit says it will be slow.

    Args:
        requested: ``auto``, ``off``, ``bf16`` or ``fp16``.
        device: The run's device.
        flags: The CPU's flags (default: read from ``/proc/cpuinfo``).
        cuda_bf16: Whether the GPU has native bf16 (default: asked of torch).
    """
    if device.type == "cpu" and flags is None:
        flags = cpu_flags(read_text(CPUINFO))
    if requested != "auto":
        reason = f"train.amp: {requested}"
        if requested == "bf16" and device.type == "cpu" and native_bf16_unit(flags or frozenset()) is None:
            reason += f"; this CPU has {NO_BF16_UNIT}, so bf16 is emulated and slower than fp32"
        return Precision(requested, requested, reason)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False) if cuda_bf16 is None else cuda_bf16
        name = torch.cuda.get_device_name(device) if cuda_bf16 is None else "this GPU"
        return Precision("auto", "bf16", f"auto: {name} has native bf16") if native else \
            Precision("auto", "off", f"auto: {name} has no native bf16 (before Ampere), so fp32")
    if device.type == "cpu":
        assert flags is not None
        if not flags:
            return Precision("auto", "off", "auto: this CPU's flags are unknown (no x86 flags in /proc/cpuinfo), "
                             "so fp32")
        unit = native_bf16_unit(flags)
        return Precision("auto", "bf16", f"auto: this CPU has {unit}") if unit else \
            Precision("auto", "off", f"auto: this CPU has {NO_BF16_UNIT} (bf16 would be emulated, slower), so fp32")
    return Precision("auto", "off", f"auto: fp32 on {device.type} (bf16 is picked on CPUs with AMX/AVX512-BF16 "
                     "and CUDA GPUs with native bf16)")


# -- peak FLOP/s ----------------------------------------------------------------------------------

def fp32_flops_per_cycle(flags: frozenset[str]) -> tuple[int, str]:
    """fp32 FLOPs per cycle per core from the vector units the flags announce, and the assumption.

    Assumes two fused multiply-add units per core at the full vector width (a multiply-add counts 2): true of
    recent Intel server cores and AMD Zen 2-4 (Zen 4 runs AVX-512 as two 256-bit halves, so 32, not 64, holds there;
    one-FMA Xeons reach half of the AVX-512 figure).
    """
    if "avx512f" in flags:
        return 64, "AVX-512: 2 FMA units x 16 fp32 lanes x 2"
    if {"avx2", "fma"} <= flags:
        return 32, "AVX2+FMA: 2 FMA units x 8 fp32 lanes x 2"
    if "avx" in flags:
        return 16, "AVX: 1 add + 1 multiply unit x 8 fp32 lanes"
    return 8, "SSE: 1 add + 1 multiply unit x 4 fp32 lanes"


def bf16_flops_per_cycle(flags: frozenset[str]) -> tuple[int, str]:
    """bf16 FLOPs per cycle per core (matrix products) from the flags, and the assumption."""
    if "amx_bf16" in flags:
        return 1024, "AMX-BF16: one 16x32x16 tile product (16,384 FLOPs) per 16 cycles"
    if "avx512_bf16" in flags:
        return 128, "AVX512-BF16: 2 units x 16 lanes x 2 bf16 pairs x 2"
    fp32, _ = fp32_flops_per_cycle(flags)
    return fp32, f"{NO_BF16_UNIT}: bf16 is converted to fp32, no faster than fp32"


def cpu_clock(cpuinfo: str, max_freq_khz: str) -> tuple[float, str]:
    """The clock (GHz) the peak assumes, and where it was read: the cpufreq driver's maximum when the kernel has one,
    else ``/proc/cpuinfo``'s ``cpu MHz`` (the current clock; the turbo clock may be higher)."""
    if max_freq_khz.strip():
        return int(max_freq_khz.strip()) / 1e6, f"max clock from {CPUFREQ_MAX}"
    mhz = cpuinfo_field(cpuinfo, "cpu MHz")
    if mhz is None:
        raise ValueError("no clock: neither cpufreq's maximum nor /proc/cpuinfo's 'cpu MHz' is readable")
    return float(mhz) / 1e3, "/proc/cpuinfo 'cpu MHz', the current clock (no cpufreq driver; turbo may be higher)"


@dataclass(frozen=True)
class Peak:
    """A CPU's peak arithmetic rate: cores x clock x FLOPs per cycle per core, with every assumption stated."""

    cores: int
    clock_ghz: float
    clock_source: str
    fp32_per_cycle: int
    fp32_unit: str
    bf16_per_cycle: int
    bf16_unit: str
    cores_note: str

    @property
    def fp32(self) -> float:
        """Peak fp32 FLOP/s."""
        return self.cores * self.clock_ghz * 1e9 * self.fp32_per_cycle

    @property
    def bf16(self) -> float:
        """Peak bf16 FLOP/s."""
        return self.cores * self.clock_ghz * 1e9 * self.bf16_per_cycle

    def describe(self) -> str:
        """The peak as a sentence with its assumptions."""
        return (f"peak {self.fp32 / 1e9:,.1f} GFLOP/s fp32 = {self.cores} cores x {self.clock_ghz:.2f} GHz x "
                f"{self.fp32_per_cycle} FLOP/cycle, bf16 {self.bf16 / 1e9:,.1f} GFLOP/s at {self.bf16_per_cycle} "
                f"FLOP/cycle. Cores: {self.cores_note}. Clock: {self.clock_source}. fp32: {self.fp32_unit}. "
                f"bf16: {self.bf16_unit}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data, with the two peaks."""
        return {**asdict(self), "fp32_flops": self.fp32, "bf16_flops": self.bf16, "text": self.describe()}


def cpu_peak(cpuinfo: str, max_freq_khz: str, cpus: int) -> Peak | None:
    """The peak of ``cpus`` logical CPUs (e.g. torch's threads) of the CPU ``cpuinfo`` describes, ``None`` without
    x86 flags (the vector width is then unknown).

    Two hyperthreads of one core share its FMA units: with ``siblings`` > ``cpu cores`` the logical CPUs are
    divided by the threads per core.
    """
    flags = cpu_flags(cpuinfo)
    if not flags:
        return None
    siblings, physical = cpuinfo_field(cpuinfo, "siblings"), cpuinfo_field(cpuinfo, "cpu cores")
    per_core = max(int(siblings) // int(physical), 1) if siblings and physical else 1
    cores = max(cpus // per_core, 1)
    note = f"{cpus} threads" + (f" / {per_core} hyperthreads per core" if per_core > 1 else ", one per core")
    ghz, source = cpu_clock(cpuinfo, max_freq_khz)
    fp32, fp32_unit = fp32_flops_per_cycle(flags)
    bf16, bf16_unit = bf16_flops_per_cycle(flags)
    return Peak(cores, ghz, source, fp32, fp32_unit, bf16, bf16_unit, note)


def this_cpu_peak() -> Peak | None:
    """:func:`cpu_peak` of this machine for the CPUs torch's intra-op threads can use."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpu_peak(read_text(CPUINFO), read_text(CPUFREQ_MAX), min(torch.get_num_threads(), available))
