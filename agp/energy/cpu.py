"""CPU seconds of this process over a window: the labelled proxy when no energy counter is readable.

It counts user + system time of every thread of this process with `time.process_time` (the
process CPU-time clock, nanosecond resolution; psutil's cpu_times moves in 10 ms ticks, too
coarse for a short window). That is meaningful where the work runs on this process's CPU
threads, as MLX does on Linux. On a Mac the GPU (or ANE) does the work and CPU seconds would
miss it, which is why powermetrics is preferred there. It is not energy: every row it produces
says "proxy".
"""
from __future__ import annotations

import time

from agp.energy.base import Meter, Reading


class CpuSecondsMeter(Meter):
    source = "cpu-seconds proxy"
    unit = "cpu-s"
    is_proxy = True

    def __init__(self):
        self._t0 = None

    def start(self) -> None:
        self._c0, self._t0 = time.process_time(), time.perf_counter()

    def stop(self) -> Reading:
        if self._t0 is None:
            raise RuntimeError("CpuSecondsMeter.stop() without start()")
        cpu, wall = time.process_time() - self._c0, time.perf_counter() - self._t0
        self._t0 = None
        return Reading(self.source, self.unit, True, cpu, wall, note="process CPU time (user + system), not energy")
