"""Lloyd-Max scalar codebooks: optimal (MSE) levels for one coordinate of a rotated unit vector.

After a random rotation, a coordinate of a unit vector in R^d has density
f(x) ∝ (1 - x^2)^((d-3)/2) on [-1, 1] (a scaled Beta, ≈ N(0, 1/d) for d >= 64). TurboQuant uses one
Lloyd-Max codebook for that density on every coordinate. `gaussian_codebook` solves it numerically
on a fine grid (exact density, not the Gaussian approximation); `fit_codebook` runs the same
iteration on data samples.
"""
from __future__ import annotations

import functools

import numpy as np

from agp.errors import AGPError

MAX_BITS = 8


def _check_bits(bits: int) -> int:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise AGPError(f"codebook bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    return int(bits)


def boundaries(codebook: np.ndarray) -> np.ndarray:
    """Decision boundaries: midpoints between sorted neighbouring levels along the last axis (one
    codebook [K] -> [K - 1]; per-coordinate codebooks [D, K] -> [D, K - 1])."""
    c = np.asarray(codebook, dtype=np.float32)
    return np.ascontiguousarray((c[..., 1:] + c[..., :-1]) * np.float32(0.5))


def quantize(x: np.ndarray, codebook: np.ndarray, bounds: np.ndarray | None = None) -> np.ndarray:
    """Index of the nearest level for every element of `x` (uint8, same shape).

    Same result as np.searchsorted(midpoints, x) (side="left"); for <= 16 levels counting the
    boundaries below x is several times faster than a binary search per element.
    """
    b = boundaries(codebook) if bounds is None else bounds
    x = np.asarray(x, dtype=np.float32)
    if len(b) > 15:
        return np.searchsorted(b, x).astype(np.uint8)
    idx = np.zeros(x.shape, np.uint8)
    for t in b:
        idx += x > t
    return idx


def _lloyd_weighted(x: np.ndarray, w: np.ndarray, levels: int, iters: int, tol: float,
                    compand: bool = False) -> np.ndarray:
    """Lloyd-Max on a weighted 1-D sample (x sorted ascending).

    With `compand` the start is the high-resolution optimum (level density ∝ f^(1/3), Panter-Dite),
    which is within a hair of the fixed point, so many-level codebooks converge in a few steps.
    """
    g = np.cbrt(w) if compand else w
    cdf = np.cumsum(g) / g.sum()
    c = np.interp((np.arange(levels) + 0.5) / levels, cdf, x)
    # x is sorted, so each cell is a slice: locate the K - 1 midpoints in x (K log N) and sum
    # cells from prefix sums, instead of a binary search of every sample (N log K) per iteration
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cwx = np.concatenate([[0.0], np.cumsum(w * x)])
    for _ in range(iters):
        edge = np.concatenate([[0], np.searchsorted(x, (c[1:] + c[:-1]) / 2, side="right"), [len(x)]])
        wsum, xsum = np.diff(cw[edge]), np.diff(cwx[edge])
        new = np.where(wsum > 0, xsum / np.maximum(wsum, 1e-300), c)
        new.sort()
        done = np.max(np.abs(new - c)) < tol * (x[-1] - x[0] + 1e-30)
        c = new
        if done:
            break
    return c


@functools.lru_cache(maxsize=64)
def _gaussian_codebook(bits: int, dim: int) -> np.ndarray:
    sd = 1.0 / np.sqrt(dim)
    lim = min(1.0, 12.0 * sd)
    x = np.linspace(-lim, lim, 1 << 16)
    if dim > 3:
        logf = 0.5 * (dim - 3) * np.log1p(-np.minimum(x * x, 1 - 1e-12))
    else:  # d <= 3: the density is flat (d=3) or U-shaped; the grid still handles it
        logf = 0.5 * (dim - 3) * np.log1p(-np.minimum(x * x, 1 - 1e-6))
    w = np.exp(logf - logf.max())
    c = _lloyd_weighted(x, w, 1 << bits, iters=300, tol=1e-7, compand=True)
    c = 0.5 * (c - c[::-1])  # the density is symmetric: make the codebook exactly so
    return c.astype(np.float32)


def gaussian_codebook(bits: int, dim: int) -> np.ndarray:
    """Lloyd-Max levels [2**bits] (float32, ascending) for a coordinate of a random unit vector in R^dim."""
    bits = _check_bits(bits)
    if not isinstance(dim, (int, np.integer)) or dim < 2:
        raise AGPError(f"codebook dim must be an integer >= 2, got {dim!r}")
    return _gaussian_codebook(bits, int(dim)).copy()


def fit_codebook(samples: np.ndarray, bits: int, iters: int = 100) -> np.ndarray:
    """Lloyd-Max levels [2**bits] (float32, ascending) fitted to data `samples` (any shape)."""
    bits = _check_bits(bits)
    x = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise AGPError("fit_codebook needs a non-empty sample of finite values")
    c = _lloyd_weighted(x, np.ones_like(x), 1 << bits, iters=iters, tol=1e-7)
    return c.astype(np.float32)


def codebook_mse(codebook: np.ndarray, dim: int) -> float:
    """Expected squared error per coordinate of `codebook` under the rotated-unit-vector density in R^dim."""
    sd = 1.0 / np.sqrt(dim)
    x = np.linspace(-min(1.0, 12 * sd), min(1.0, 12 * sd), 1 << 16)
    w = np.exp(0.5 * (dim - 3) * np.log1p(-np.minimum(x * x, 1 - 1e-12)))
    w /= w.sum()
    c = np.asarray(codebook, dtype=np.float64)
    q = c[np.searchsorted((c[1:] + c[:-1]) / 2, x)]
    return float(np.sum(w * (x - q) ** 2))
