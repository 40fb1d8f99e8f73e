"""The one wall-clock timer of every bench: a single call, the best of several, or all samples.

Benches compare rows measured in one process, so they share this clock and its warm-up rule.
"""
from __future__ import annotations

import time

import numpy as np


def timed(fn, *args):
    """(seconds, result) of one call fn(*args)."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def samples(fn, repeats: int, warmup: int = 0) -> np.ndarray:
    """Seconds of each of `repeats` calls of fn(), after `warmup` untimed calls (graph build, caches)."""
    for _ in range(warmup):
        fn()
    return np.asarray([timed(fn)[0] for _ in range(repeats)])


def best_of(fn, repeats: int):
    """(fastest seconds over `repeats` calls of fn(), the last call's result): the least disturbed run."""
    best, result = float("inf"), None
    for _ in range(repeats):
        seconds, result = timed(fn)
        best = min(best, seconds)
    return best, result
