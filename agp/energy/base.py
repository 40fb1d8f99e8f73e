"""The meter interface every energy source shares, the `Reading` it returns, and energy per unit of work."""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from agp.errors import AGPError

SOURCES = ("powermetrics", "rapl", "cpu-seconds proxy")


class EnergyUnavailable(AGPError):
    """This meter cannot measure on this machine; the message is the one-line reason."""


@dataclass
class Reading:
    """Energy spent over one measured window."""
    source: str                     # one of SOURCES
    unit: str                       # "J", or "cpu-s" for the proxy
    is_proxy: bool                  # True: not energy, a stand-in for it (CPU time)
    total: float
    seconds: float                  # wall time of the window
    breakdown: dict = field(default_factory=dict)   # per domain: {"cpu": J, "gpu": J, "ane": J}, RAPL zones, ...
    note: str | None = None         # how the total was obtained where that is not plain (e.g. scaled sampling)

    @property
    def label(self) -> str:
        # the proxy's source name carries the word "proxy", so every printed label says so
        return f"{self.unit} ({self.source})"

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


class Meter(ABC):
    """start() opens a window, stop() closes it and returns its Reading. One window at a time.
    An unusable meter raises EnergyUnavailable from its constructor, before any window opens."""
    source = ""
    unit = "J"
    is_proxy = False

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> Reading: ...

    @contextmanager
    def window(self):
        """`with meter.window() as w: ...` then `w.reading`; an exception inside still closes the window."""
        w = Window()
        self.start()
        try:
            yield w
        finally:
            w.reading = self.stop()


@dataclass
class Window:
    reading: Reading | None = None


def unit_label(unit: str, is_proxy: bool, per: str) -> str:
    return f"{unit}/{per}" + (" (proxy)" if is_proxy else "")


def per_unit(reading, tokens: int, accepted: float | None, decisions: int | None) -> dict:
    """Energy per emitted token, per accepted token and per routing decision (None where the count
    is 0 or unknown), each with its unit label, e.g. "J/token" or "cpu-s/token (proxy)".
    `reading` is a Reading or its to_dict()."""
    r = reading if isinstance(reading, dict) else reading.to_dict()
    div = lambda n: r["total"] / n if n else None  # noqa: E731
    u, p = r["unit"], r["is_proxy"]
    return {"source": r["source"], "is_proxy": p, "total": r["total"],
            "unit": unit_label(u, p, "token"),
            "per_token": div(tokens), "per_accepted_token": div(accepted), "per_decision": div(decisions),
            "units": {"per_token": unit_label(u, p, "token"), "per_accepted_token": unit_label(u, p, "accepted token"),
                      "per_decision": unit_label(u, p, "routing decision")}}
