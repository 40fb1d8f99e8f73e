"""How fast the oracle labels positions, against the bound its head matmuls set.

Every probe position costs one vocabulary-wide head matmul per probe layer plus one for the teacher;
nothing exact avoids them, so the bound is those matmuls alone, timed at the shapes `probe_stats`
issues, on the same machine and in the same process as the labelling they bound.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from agp.oracle.probes import probe_stats


@dataclass
class OracleSpeed:
    method: str
    positions: int
    seconds: float             # best of the repeats, one batch of `positions`
    bound_seconds: float       # the same batch's head matmuls alone (best of the repeats)

    @property
    def positions_per_s(self) -> float:
        return self.positions / self.seconds

    @property
    def bound_positions_per_s(self) -> float:
        return self.positions / self.bound_seconds

    def to_dict(self) -> dict:
        return dict(asdict(self), positions_per_s=self.positions_per_s,
                    bound_positions_per_s=self.bound_positions_per_s,
                    over_bound=self.seconds / self.bound_seconds)


def head_matmul_seconds(bb, positions: int, n_layers: int, group: int = 2, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds of the head matmuls one probe batch needs: the teacher's on
    `positions` rows and one per group of `group` probe layers on group x positions rows."""
    hidden = bb.hidden_size
    shapes = [positions] + [positions * min(group, n_layers - i) for i in range(0, n_layers, group)]
    inputs = [mx.random.normal((rows, hidden), key=mx.random.key(rows)) for rows in shapes]
    mx.eval(inputs)
    best = float("inf")
    for _ in range(repeats + 1):                    # the first round warms allocation and BLAS threads
        seconds = 0.0
        for x in inputs:
            seconds += _timed_eval(lambda: bb.head(x))
        best = min(best, seconds)
    return best


def measure(bb, hidden: dict, final: np.ndarray, layers: list[int], translators=None, full_layers=None,
            group: int = 2, methods=("reference", "fast"), repeats: int = 2) -> list[OracleSpeed]:
    """One batch labelled by each method (interleaved, best of `repeats`), beside the bound."""
    best = {m: float("inf") for m in methods}
    bound = float("inf")
    for _ in range(repeats):
        for method in methods:
            best[method] = min(best[method], _timed_eval(
                lambda: probe_stats(bb, hidden, final, layers, translators, group, full_layers, method=method)))
        bound = min(bound, head_matmul_seconds(bb, len(final), len(layers), group, repeats=1))
    return [OracleSpeed(m, len(final), best[m], bound) for m in methods]


def _timed_eval(fn) -> float:
    import time
    start = time.perf_counter()
    out = fn()
    if isinstance(out, mx.array):
        mx.eval(out)
    return time.perf_counter() - start
