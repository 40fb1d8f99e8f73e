"""Seeded orthogonal rotations that spread a vector's energy evenly over its coordinates.

TurboQuant quantizes each coordinate of a *rotated* unit vector with one fixed codebook; that is
only right when every coordinate has the same (near-Gaussian, variance 1/d) distribution, whatever
the input. A random rotation gives that. Two kinds:

- ``hadamard`` (fast, O(d log d)): rounds of random signs, a random permutation and a block
  Walsh-Hadamard transform. When ``dim`` is a power of two the block is the whole vector. When
  ``dim`` = b*k with b a power of two >= 64 (640 = 128*5, 1536 = 512*3) the transform runs on
  b-blocks and the permutations between rounds mix the blocks, so no padding is needed. Otherwise
  the vector is zero-padded to the next power of two (``padded_dim`` > ``dim``).
- ``dense``: a Haar-random orthogonal matrix (QR of a Gaussian matrix) — the reference the paper
  analyses; O(d^2) per vector.
"""
from __future__ import annotations

import functools

import numpy as np

from agp.errors import AGPError

KINDS = ("hadamard", "dense")
MIN_BLOCK = 64  # smaller Hadamard blocks mix too little; pad to a power of two instead


def _pow2_factor(n: int) -> int:
    return n & (-n)


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


MAX_FACTOR = 128  # Hadamard factors applied as small dense matmuls (BLAS) instead of log2(b) NumPy passes


@functools.lru_cache(maxsize=16)
def _hadamard(n: int) -> np.ndarray:
    """Orthonormal Sylvester Hadamard matrix [n, n] (n a power of two), float32."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def _factors(block: int) -> list[int]:
    out = []
    while block > MAX_FACTOR:
        out.append(MAX_FACTOR)
        block //= MAX_FACTOR
    return [block] + out


def fwht(y: np.ndarray, block: int) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of every contiguous `block` of the last axis (returns a new array).

    Uses H_(ab) = H_a ⊗ H_b: the block is viewed as a tensor with axes of size <= 128 and each axis
    is multiplied by a small Hadamard matrix, so the work runs in BLAS (same result as the butterfly).
    """
    n, d = y.shape
    fs = _factors(block)
    v = np.asarray(y, dtype=np.float32).reshape(n * (d // block), *fs)
    if len(fs) == 1:
        return (v @ _hadamard(block)).reshape(n, d)
    for ax, f in enumerate(fs):
        v = np.moveaxis(np.moveaxis(v, ax + 1, -1) @ _hadamard(f), -1, ax + 1)
    return np.ascontiguousarray(v).reshape(n, d)


@functools.lru_cache(maxsize=8)
def _haar(dim: int, seed: int) -> np.ndarray:
    """Seeded Haar-random orthogonal matrix (QR of a Gaussian, signs fixed); cached: QR is O(d^3)."""
    rng = np.random.default_rng([0x5EED, seed, dim, 1])
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q *= np.sign(np.diag(r))  # makes the distribution Haar
    q = q.astype(np.float32)
    q.flags.writeable = False
    return q


class Rotation:
    """A seeded orthogonal map R: R^dim -> R^padded_dim (norm-preserving; `invert` undoes it)."""

    def __init__(self, dim: int, seed: int = 0, kind: str = "hadamard"):
        if kind not in KINDS:
            raise AGPError(f"unknown rotation kind {kind!r}; use one of {', '.join(KINDS)}")
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise AGPError(f"rotation dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.seed = int(seed)
        self.kind = kind
        rng = np.random.default_rng([0x5EED, self.seed, self.dim, KINDS.index(kind)])
        if kind == "dense":
            self.padded_dim = self.dim
            self.matrix = _haar(self.dim, self.seed)
            return
        p2 = _pow2_factor(self.dim)
        if p2 == self.dim:
            self.padded_dim, self.block, rounds = self.dim, self.dim, 2
        elif p2 >= MIN_BLOCK:
            self.padded_dim, self.block, rounds = self.dim, p2, 3
        else:
            self.padded_dim = _next_pow2(self.dim)
            self.block, rounds = self.padded_dim, 2
        n = self.padded_dim
        self.signs = [np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32) for _ in range(rounds)]
        # a block-diagonal Hadamard never moves energy between blocks: permute before every round
        self.perms = [rng.permutation(n) if self.block < n else None for _ in range(rounds)]
        self.inv_perms = [None if p is None else np.argsort(p) for p in self.perms]

    @staticmethod
    def padded_dim_for(dim: int) -> int:
        """The hadamard kind's output length for `dim` (dim itself unless it must be zero-padded)."""
        p2 = _pow2_factor(int(dim))
        return int(dim) if p2 == dim or p2 >= MIN_BLOCK else _next_pow2(int(dim))

    def _check(self, x: np.ndarray, width: int, what: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != width:
            raise AGPError(f"Rotation.{what} expects an array [N, {width}], got shape {x.shape}")
        return x

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Rotate rows: [N, dim] -> [N, padded_dim] float32."""
        x = self._check(x, self.dim, "apply")
        if self.kind == "dense":
            return x @ self.matrix.T
        y = np.zeros((x.shape[0], self.padded_dim), np.float32)
        y[:, : self.dim] = x
        for s, p in zip(self.signs, self.perms):
            y *= s
            if p is not None:
                y = y[:, p]
            y = fwht(y, self.block)
        return y

    def invert(self, y: np.ndarray) -> np.ndarray:
        """Undo `apply`: [N, padded_dim] -> [N, dim] float32 (drops the padded coordinates)."""
        y = self._check(y, self.padded_dim, "invert")
        if self.kind == "dense":
            return y @ self.matrix
        y = y.copy()
        for s, ip in zip(reversed(self.signs), reversed(self.inv_perms)):
            y = fwht(y, self.block)  # the orthonormal Hadamard is its own inverse
            if ip is not None:
                y = y[:, ip]
            y *= s
        return np.ascontiguousarray(y[:, : self.dim])
