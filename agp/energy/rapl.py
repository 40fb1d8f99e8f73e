"""Linux RAPL energy counters (`/sys/class/powercap/intel-rapl:*`) read around a window, in joules.

Each top-level zone `intel-rapl:N` (its `name` file says e.g. "package-0" or "psys") holds
`energy_uj`, a counter that wraps at `max_energy_range_uj`; its subzones `intel-rapl:N:M`
("core", "uncore", "dram") form the breakdown. The total is the sum of the package zones: psys
(platform) already contains them, so it is only summed when there is no package zone. Counters
are machine-wide, not per process: other load on the host lands in the reading too.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from agp.energy.base import EnergyUnavailable, Meter, Reading

ROOT = Path("/sys/class/powercap")
TOP = re.compile(r"intel-rapl:\d+$")
SUB = re.compile(r"intel-rapl:\d+:\d+$")


def _read_int(p: Path) -> int:
    try:
        return int(p.read_text().strip())
    except PermissionError as e:
        raise EnergyUnavailable(f"RAPL: {p} is root-only on this kernel (PermissionError); run as root or make "
                                f"energy_uj readable (chmod o+r) to measure joules") from e
    except (OSError, ValueError) as e:
        raise EnergyUnavailable(f"RAPL: cannot read {p} ({type(e).__name__})") from e


class RaplMeter(Meter):
    source = "rapl"
    unit = "J"

    def __init__(self, root: str | Path = ROOT):
        self.root = Path(root)
        self.zones = self._zones()          # [(label, dir, max_energy_range_uj, is_package)]
        self._e0 = None
        self._read()                        # unreadable counters fail here, before any window opens

    def _zones(self) -> list:
        tops = sorted(p for p in self.root.glob("intel-rapl:*") if TOP.match(p.name)) if self.root.is_dir() else []
        if not tops:
            raise EnergyUnavailable(f"RAPL: no intel-rapl:* zones under {self.root} (no powercap RAPL driver here, "
                                    f"e.g. a VM or a non-Intel/AMD host)")
        zones = []
        for top in tops:
            name = _name(top)
            zones.append((name, top, _read_int(top / "max_energy_range_uj"), name.startswith("package")))
            for sub in sorted(p for p in top.iterdir() if SUB.match(p.name)):
                zones.append((f"{name}/{_name(sub)}", sub, _read_int(sub / "max_energy_range_uj"), False))
        return zones

    def _read(self) -> list[int]:
        return [_read_int(d / "energy_uj") for _, d, _, _ in self.zones]

    def start(self) -> None:
        self._e0, self._t0 = self._read(), time.perf_counter()

    def stop(self) -> Reading:
        if self._e0 is None:
            raise RuntimeError("RaplMeter.stop() without start()")
        e1, wall = self._read(), time.perf_counter() - self._t0
        joules = {}
        for (label, _, top, _), a, b in zip(self.zones, self._e0, e1):
            # the counter wrapped (at most once: it takes minutes at package power to wrap)
            joules[label] = ((b - a) if b >= a else (b + top - a)) / 1e6
        self._e0 = None
        packages = [lab for lab, _, _, pkg in self.zones if pkg]
        tops = packages or [lab for lab in joules if "/" not in lab]
        return Reading(self.source, self.unit, False, sum(joules[k] for k in tops), wall, joules,
                       note=f"sum of {', '.join(tops)}; machine-wide counters")


def _name(d: Path) -> str:
    try:
        return (d / "name").read_text().strip() or d.name
    except OSError:
        return d.name
