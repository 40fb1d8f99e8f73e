"""Encoding rotated rows to per-coordinate Lloyd-Max codes: a uniform-grid lookup, chunked over threads.

Nearest level of coordinate j = the number of j's decision boundaries below z (strict). Counting them
costs one pass per boundary (255 at 8 bits). Instead each coordinate's range is cut into a uniform
grid of bins narrower than half its smallest positive boundary gap, so one bin holds at most one
distinct boundary value; per bin we store the count below the bin (`low`) and the boundary inside
it (`inside`, +inf if none). A value's code is then `low[bin] + (z > inside[bin])`: ~9 array passes
(+3 to gather the level values) for any bit width, against one pass per boundary for counting
(15 at 4 bits, 255 at 8).

The tables are built by applying the very same float32 bin formula to the boundaries themselves, and
the formula is monotone in z, so the result equals counting exactly (checked in tests/test_index.py);
a codebook whose grid would be too fine (near-coincident levels) or with coincident boundaries
(three equal levels) falls back to counting.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from agp.quant import lloyd_max

MAX_BINS = 1 << 14      # per coordinate; beyond this the tables leave the caches and counting wins
BLOCK_ROWS = 16384      # rows rotated per BLAS call
CHUNK_ROWS = 2048       # rows per quantize task: [2048, 640] float32 = 5 MB, stays in L2/L3 across passes


class GridQuantizer:
    """Per-coordinate nearest-level codes for a [pd, K] codebook (levels sorted along K)."""

    def __init__(self, codebook: np.ndarray):
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.bounds = lloyd_max.boundaries(self.codebook)       # [pd, K - 1]
        self.row_k = np.arange(self.codebook.shape[0], dtype=np.intp) * self.codebook.shape[1]
        self.tables = self._tables()

    def _tables(self):
        b = self.bounds.astype(np.float64)
        pd, nbd = b.shape
        gaps = np.diff(b, axis=1)
        pos = np.where(gaps > 0, gaps, np.inf).min(axis=1)
        span = b[:, -1] - b[:, 0]
        pos = np.where(np.isfinite(pos), pos, np.maximum(span, 1.0))   # one distinct value
        inv_w = (2.0 / pos).astype(np.float32)
        nb = int(np.max(np.floor(span * inv_w))) + 3
        if not np.all(np.isfinite(inv_w)) or nb > MAX_BINS:
            return None
        shift = (1.0 - b[:, 0] * inv_w).astype(np.float32)
        bins = self._bins(np.ascontiguousarray(self.bounds.T), inv_w, shift, nb).T   # the data's formula
        same = bins[:, 1:] == bins[:, :-1]
        if np.any(same & (self.bounds[:, 1:] != self.bounds[:, :-1])):
            return None                                         # two distinct boundaries share a bin
        flat = (bins + (np.arange(pd)[:, None] * nb)).ravel()
        count = np.bincount(flat, minlength=pd * nb).reshape(pd, nb)
        if count.max() > 1:
            return None                                         # equal boundaries: code + 1 is not enough
        low = (np.cumsum(count, axis=1) - count).astype(np.uint8)
        inside = np.full(pd * nb, np.inf, np.float32)
        inside[flat] = self.bounds.ravel()
        return inv_w, shift, nb, np.arange(pd, dtype=np.intp) * nb, low.ravel(), inside

    @staticmethod
    def _bins(z: np.ndarray, inv_w: np.ndarray, shift: np.ndarray, nb: int) -> np.ndarray:
        t = z * inv_w
        t += shift
        np.clip(t, 0, nb - 1, out=t)
        return t.astype(np.intp)   # non-negative after the clip: truncation is floor; intp: take needs it

    def __call__(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, pd] float32 -> ([N, pd] uint8 level indices, [N, pd] float32 level values)."""
        if self.tables is None:
            codes = count_below(z, self.bounds)
        else:
            inv_w, shift, nb, row, low, inside = self.tables
            flat = self._bins(z, inv_w, shift, nb)
            flat += row
            codes = np.take(low, flat)
            codes += z > np.take(inside, flat)   # a bin holds at most one boundary (the tables check it)
        # levels from the [pd, K] codebook (L2-sized), measured faster than per-bin level tables
        at = codes.astype(np.intp)
        at += self.row_k
        return codes, np.take(self.codebook.ravel(), at)


def count_below(z: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """[N, pd] uint8: how many of each coordinate's boundaries (bounds [pd, t]) lie below z."""
    idx = np.zeros(z.shape, np.uint8)
    for t in range(bounds.shape[1]):
        idx += z > bounds[:, t]
    return idx


def map_chunks(fn, n: int, chunk: int) -> list:
    """[fn(lo, hi) for each chunk of n rows], on a thread pool when there is more than one chunk."""
    spans = [(i, min(n, i + chunk)) for i in range(0, n, chunk)]
    if len(spans) <= 1 or (os.cpu_count() or 1) <= 1:
        return [fn(a, b) for a, b in spans]
    with ThreadPoolExecutor(min(len(spans), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda s: fn(*s), spans))


def encode_rows(x: np.ndarray, rotate, finish, block: int = BLOCK_ROWS, chunk: int = CHUNK_ROWS) -> list:
    """[finish(z) for every CHUNK_ROWS rows of z = rotate(x block)]. The rotation is one BLAS matmul
    per block (BLAS threads it itself); the element-wise passes of `finish` use one core per call, so
    a block's chunks go to a thread pool (NumPy releases the GIL). Running the matmul inside the pool
    instead oversubscribes the cores with BLAS threads and measured no faster than one thread."""
    threads = os.cpu_count() or 1
    out = []
    with ThreadPoolExecutor(threads) as pool:
        for i in range(0, len(x), block):
            z = rotate(x[i:i + block])
            out += pool.map(finish, [z[j:j + chunk] for j in range(0, len(z), chunk)])
    return out
