"""argparse `type=` helpers: numeric arguments are checked when the command line is parsed.

A bad value is refused by argparse itself with one line naming the flag, the value and the
range (`agp data build: error: argument --oversample: -1 is not in 1..100`), exit status 2,
before any model, file or index is touched. Every command's numeric flags use these.
"""
from __future__ import annotations

import argparse
import math

SEED_MAX = 2**32 - 1   # rotation / RNG seeds are stored as u32


def int_range(lo: int | None = None, hi: int | None = None):
    """An int in [lo, hi] (either bound may be None)."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} must be {_span(lo, hi)}")
        return value

    parse.__name__ = "integer"   # argparse names the type in its own messages
    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """A finite float in [lo, hi] ((lo, hi] with lo_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        if not math.isfinite(value) or too_low or (hi is not None and value > hi):
            bounds = [f"{'>' if lo_open else '>='} {lo}" if lo is not None else "",
                      f"<= {hi}" if hi is not None else ""]
            raise argparse.ArgumentTypeError(" and ".join([f"{value} must be a finite number", *filter(None, bounds)]))
        return value

    parse.__name__ = "number"
    return parse


def int_list_text(lo: int | None = None, hi: int | None = None):
    """A comma-separated list of ints each in [lo, hi]; returns the text unchanged, so code that
    splits it later keeps working, but a bad entry is refused at parse time."""
    check = int_range(lo, hi)

    def parse(text: str) -> str:
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
        for part in parts:
            check(part)
        return text

    parse.__name__ = "integer list"
    return parse


def positive_int(hi: int | None = None):
    """An int >= 1 (and <= hi)."""
    return int_range(1, hi)


def non_negative_int(hi: int | None = None):
    """An int >= 0 (and <= hi)."""
    return int_range(0, hi)


def seed():
    """A seed that fits in 32 bits (0 .. 2**32 - 1)."""
    return int_range(0, SEED_MAX)


def non_empty_path(text: str) -> str:
    """A path argument that is not the empty string ('' would mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not allowed; name a file or directory")
    return text


def _span(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in {lo}..{hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"
