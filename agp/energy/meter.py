"""Choose the best energy meter this machine allows, and say why the better ones were not used."""
from __future__ import annotations

import sys

from agp.energy.base import EnergyUnavailable, Meter, Reading, per_unit
from agp.energy.cpu import CpuSecondsMeter
from agp.energy.powermetrics import PowermetricsMeter
from agp.energy.rapl import RaplMeter
from agp.errors import AGPError

__all__ = ["CHOICES", "CpuSecondsMeter", "EnergyUnavailable", "Meter", "PowermetricsMeter", "RaplMeter",
           "Reading", "per_unit", "pick"]

CHOICES = ("auto", "powermetrics", "rapl", "cpu")
_MAKE = {"powermetrics": PowermetricsMeter, "rapl": RaplMeter, "cpu": CpuSecondsMeter}


def pick(preferred: str = "auto") -> tuple[Meter, list[str]]:
    """The meter to use and one-line notes on why better ones were not. "auto" tries powermetrics
    on macOS, RAPL on Linux, then falls back to the CPU-seconds proxy and never raises; a named
    meter that cannot measure here is a one-line AGPError."""
    if preferred not in CHOICES:
        raise AGPError(f"--energy must be one of {', '.join(CHOICES)}, got '{preferred}'")
    if preferred != "auto":
        try:
            return _MAKE[preferred](), []
        except EnergyUnavailable as e:
            raise AGPError(f"--energy {preferred} is unavailable here: {e}") from e
    order = ["powermetrics"] if sys.platform == "darwin" else ["rapl"] if sys.platform.startswith("linux") else []
    notes = []
    for name in order:
        try:
            return _MAKE[name](), notes
        except EnergyUnavailable as e:
            notes.append(f"{name} not used: {e}")
    if sys.platform != "darwin":
        notes.append("powermetrics not used: it is macOS-only")
    if not sys.platform.startswith("linux"):
        notes.append("rapl not used: it is Linux-only")
    notes.append("energy is a CPU-seconds proxy (this process's CPU time), not joules")
    return CpuSecondsMeter(), notes


def choose(preferred: str = "auto") -> tuple[Meter | None, dict]:
    """pick(), for a benchmark that must run whatever the meter does: a requested meter that is
    unavailable gives no meter and energy marked unavailable with the reason, nothing else fails.
    Returns (meter or None, {"source", "unit", "is_proxy", "notes", "unavailable"})."""
    try:
        meter, notes = pick(preferred)
    except AGPError as e:
        if preferred not in CHOICES:
            raise
        return None, {"source": None, "unit": None, "is_proxy": None, "notes": [str(e)], "unavailable": str(e)}
    return meter, {"source": meter.source, "unit": meter.unit, "is_proxy": meter.is_proxy, "notes": notes,
                   "unavailable": None}
