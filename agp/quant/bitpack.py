"""Tight bit packing of small integer codes: d codes of b bits -> ceil(d*b/8) bytes per row, no padding
between codes. Little-endian bit order: code j occupies bits [j*b, (j+1)*b) of the row's bit stream,
least significant bit first. Vectorised (NumPy), any b in 1..8."""
from __future__ import annotations

import numpy as np

from agp.errors import AGPError


def _check(bits: int) -> int:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise AGPError(f"bit width must be an integer in 1..8, got {bits!r}")
    return int(bits)


def packed_size(d: int, bits: int) -> int:
    """Bytes one packed row of d codes takes."""
    return (int(d) * _check(bits) + 7) // 8


def pack(idx: np.ndarray, bits: int) -> np.ndarray:
    """[N, d] uint8 codes (each < 2**bits) -> [N, ceil(d*bits/8)] uint8."""
    bits = _check(bits)
    idx = np.asarray(idx)
    if idx.ndim != 2:
        raise AGPError(f"pack expects a 2-D code array [N, d], got shape {idx.shape}")
    idx = idx.astype(np.uint8, copy=False)
    n, d = idx.shape
    if bits == 8:
        return np.ascontiguousarray(idx)
    if idx.size and int(idx.max()) >> bits:
        raise AGPError(f"codes do not fit in {bits} bits (max {int(idx.max())})")
    if bits == 4 and d % 2 == 0:  # the common case: two nibbles per byte, low nibble first
        return np.ascontiguousarray(idx[:, 0::2] | (idx[:, 1::2] << 4))
    planes = (idx[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1  # [N, d, bits]
    return np.packbits(planes.reshape(n, d * bits), axis=1, bitorder="little")


def unpack(packed: np.ndarray, bits: int, d: int) -> np.ndarray:
    """[N, ceil(d*bits/8)] uint8 -> [N, d] uint8 codes."""
    bits = _check(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != packed_size(d, bits):
        raise AGPError(f"packed codes must be [N, {packed_size(d, bits)}] for d={d} at {bits} bits, "
                       f"got shape {packed.shape}")
    n = packed.shape[0]
    if bits == 8:
        return packed.copy()
    if bits == 4 and d % 2 == 0:
        out = np.empty((n, d), np.uint8)
        out[:, 0::2] = packed & 0x0F
        out[:, 1::2] = packed >> 4
        return out
    planes = np.unpackbits(packed, axis=1, count=d * bits, bitorder="little").reshape(n, d, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (planes * weights).sum(axis=2, dtype=np.uint8)
