"""The codec interface and the self-describing blob every codec writes.

A codec turns an array [..., dim] into bytes and back: ``encode(array) -> bytes``,
``decode(bytes) -> array``, ``.meta`` (scheme, version, parameters). The bytes carry their own
header so a receiver needs nothing else:

    u8  codec id            (CODEC_IDS)
    u8  codec version
    u8  ndim (1..4)
    varint * ndim           shape (LEB128, each >= 1, at most MAX_ELEMENTS elements in all)
    ...                     codec parameters and body (see each codec)

Every length the decoder uses is computed from the shape and checked against the bytes actually
present *before* anything is allocated, so a lying header costs nothing (see docs/codecs.md).
"""
from __future__ import annotations

import abc

import numpy as np

from agp.errors import AGPError

CODEC_IDS = {"f32": 0, "fp16": 1, "q8_0": 2, "turboquant": 3}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
CODEC_VERSIONS = {"f32": 1, "fp16": 1, "q8_0": 1, "turboquant": 1}  # the byte format each decoder reads
MAX_NDIM = 4
MAX_ELEMENTS = 1 << 28  # 1 GiB of fp32: nothing legitimate in a packet is bigger


class CodecError(AGPError):
    """Codec bytes that cannot be decoded (names the reason and the offset)."""


class CodecRangeError(CodecError):
    """Finite values a codec cannot represent: refused at encode time, so no blob is ever written
    that its own decoder would reject or that silently changed the values."""


FP16_MAX = 65504.0
Q8_MAX_ABS = FP16_MAX * 127   # the block scale max|x|/127 is stored as fp16


def check_range(rows: np.ndarray, limit: float, codec: str, why: str) -> None:
    """Refuse rows holding |value| > limit (names the first element and the way out)."""
    over = np.abs(rows) > limit
    if over.any():
        flat = int(np.flatnonzero(over)[0])
        raise CodecRangeError(f"{codec} cannot encode {float(rows.flat[flat]):.6g} at element {flat}: {why} "
                              f"(|x| <= {limit:.6g}); scale the array down or use the f32 codec")


def write_varint(n: int) -> bytes:
    """LEB128 encoding of a non-negative int."""
    if n < 0:
        raise CodecError(f"varint must be non-negative, got {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf, off: int, what: str = "varint", max_bytes: int = 5) -> tuple[int, int]:
    """Decode a LEB128 int at `off` (at most `max_bytes` bytes); returns (value, next offset)."""
    n = shift = 0
    for i in range(max_bytes):
        if off + i >= len(buf):
            raise CodecError(f"truncated {what} at offset {off}: the bytes end inside it")
        b = buf[off + i]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, off + i + 1
    raise CodecError(f"{what} at offset {off} is longer than {max_bytes} bytes: corrupt length field")


def write_header(codec_id: int, version: int, shape: tuple[int, ...]) -> bytes:
    return bytes((codec_id, version, len(shape))) + b"".join(write_varint(int(s)) for s in shape)


def read_header(buf, expect_id: int | None = None) -> tuple[int, int, tuple[int, ...], int]:
    """Parse (codec id, version, shape, body offset) with every bound checked."""
    if len(buf) < 3:
        raise CodecError(f"codec blob of {len(buf)} bytes is shorter than its 3-byte header")
    cid, ver, ndim = buf[0], buf[1], buf[2]
    if cid not in CODEC_NAMES:
        raise CodecError(f"unknown codec id {cid} at offset 0 (known: {sorted(CODEC_NAMES)})")
    if expect_id is not None and cid != expect_id:
        raise CodecError(f"codec id {cid} ({CODEC_NAMES[cid]}) where {CODEC_NAMES[expect_id]} was expected")
    if not 1 <= ndim <= MAX_NDIM:
        raise CodecError(f"codec blob claims {ndim} dimensions at offset 2; allowed 1..{MAX_NDIM}")
    off, shape, total = 3, [], 1
    for _ in range(ndim):
        s, off = read_varint(buf, off, "shape entry")
        if s < 1:
            raise CodecError(f"zero-length dimension in codec shape at offset {off}")
        total *= s
        if total > MAX_ELEMENTS:
            raise CodecError(f"codec shape claims more than {MAX_ELEMENTS} elements: refusing absurd length")
        shape.append(s)
    return cid, ver, tuple(shape), off


def as_rows(array) -> tuple[np.ndarray, tuple[int, ...]]:
    """View `array` as float32 rows [N, dim]; returns (rows, original shape)."""
    a = np.asarray(array)
    if a.ndim == 0 or a.ndim > MAX_NDIM or a.size == 0:
        raise CodecError(f"codecs take arrays of 1..{MAX_NDIM} dimensions with at least one element, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise CodecError(f"codecs take numeric arrays, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise CodecError("array holds NaN or Inf: a hidden state must be finite (check the producer)")
    return a.reshape(-1, a.shape[-1]), a.shape


def expect_len(buf, off: int, need: int, what: str) -> None:
    if len(buf) - off != need:
        raise CodecError(f"{what}: body is {len(buf) - off} bytes after offset {off}, the header implies {need}")


class Codec(abc.ABC):
    """Base: subclasses set `name`, `version` and implement encode/decode."""

    name = "?"
    version = 1

    @property
    def meta(self) -> dict:
        return {"scheme": self.name, "version": self.version, "codec_id": CODEC_IDS[self.name]}

    def _header(self, blob) -> tuple[tuple[int, ...], int]:
        _, ver, shape, off = read_header(blob, CODEC_IDS[self.name])
        if ver != self.version:
            raise CodecError(f"{self.name} codec version {ver} is not supported (this build reads version {self.version})")
        return shape, off

    @abc.abstractmethod
    def encode(self, array) -> bytes:
        """Array -> self-describing blob."""

    @abc.abstractmethod
    def decode(self, blob) -> np.ndarray:
        """Blob -> array (rejects malformed blobs with CodecError)."""


class F32(Codec):
    """Raw little-endian float32: the lossless reference. Decode is a zero-copy view."""

    name = "f32"

    def encode(self, array) -> bytes:
        rows, shape = as_rows(array)
        return write_header(CODEC_IDS[self.name], self.version, shape) + rows.astype("<f4").tobytes()

    def decode(self, blob) -> np.ndarray:
        shape, off = self._header(blob)
        n = int(np.prod(shape))
        expect_len(blob, off, 4 * n, "f32 blob")
        out = np.frombuffer(blob, dtype="<f4", count=n, offset=off)
        _finite(out, "f32 values")
        return out.reshape(shape)


class FP16(Codec):
    """IEEE half precision (values beyond ±65504 are refused, never clamped). Decode is a zero-copy float16 view."""

    name = "fp16"

    def encode(self, array) -> bytes:
        rows, shape = as_rows(array)
        check_range(rows, FP16_MAX, "fp16", "it is beyond the largest half-precision value")
        half = rows.astype("<f2")
        return write_header(CODEC_IDS[self.name], self.version, shape) + half.tobytes()

    def decode(self, blob) -> np.ndarray:
        shape, off = self._header(blob)
        n = int(np.prod(shape))
        expect_len(blob, off, 2 * n, "fp16 blob")
        out = np.frombuffer(blob, dtype="<f2", count=n, offset=off)
        _finite(out, "fp16 values")
        return out.reshape(shape)


Q8_BLOCK = 32
Q8_DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", (Q8_BLOCK,))])  # GGML block_q8_0: 34 bytes


class Q8_0(Codec):
    """GGML q8_0: blocks of 32 values, one fp16 scale d = max|x|/127 and 32 int8 q = round(x/d).

    Rows whose length is not a multiple of 32 are zero-padded to the next block (the padding
    decodes to zeros and is dropped). Byte layout is exactly GGML's block_q8_0 array.
    """

    name = "q8_0"

    def encode(self, array) -> bytes:
        rows, shape = as_rows(array)
        check_range(rows, Q8_MAX_ABS, "q8_0", "its block scale max|x|/127 would overflow fp16")
        n, d = rows.shape
        nb = -(-d // Q8_BLOCK)
        x = np.zeros((n, nb * Q8_BLOCK), np.float32)
        x[:, :d] = rows
        x = x.reshape(n * nb, Q8_BLOCK)
        amax = np.abs(x).max(axis=1).astype(np.float64)
        scale = amax / 127.0
        # GGML's id = d ? 1/d : 0; in float64 so a subnormal d cannot overflow to inf
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        blocks = np.empty(n * nb, Q8_DTYPE)
        blocks["d"] = scale.astype(np.float16)
        blocks["qs"] = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int8)  # |x|*inv <= 127 by construction
        return write_header(CODEC_IDS[self.name], self.version, shape) + blocks.tobytes()

    def decode(self, blob) -> np.ndarray:
        shape, off = self._header(blob)
        d = shape[-1]
        n = int(np.prod(shape[:-1]))
        nb = -(-d // Q8_BLOCK)
        expect_len(blob, off, n * nb * Q8_DTYPE.itemsize, "q8_0 blob")
        blocks = np.frombuffer(blob, dtype=Q8_DTYPE, count=n * nb, offset=off)
        _finite(blocks["d"], "q8_0 block scales")
        x = blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
        return x.reshape(n, nb * Q8_BLOCK)[:, :d].reshape(shape)


def get_codec(name: str, **params) -> Codec:
    """A codec by scheme name: f32, fp16, q8_0, turboquant (params: dim, bits, seed, qjl, rotation)."""
    if name == "turboquant":
        from agp.quant.turboquant import TurboQuant
        return TurboQuant(**params)
    table = {"f32": F32, "fp16": FP16, "q8_0": Q8_0}
    if name not in table:
        raise AGPError(f"unknown codec {name!r}; use one of {', '.join(CODEC_IDS)}")
    if params:
        raise AGPError(f"codec {name} takes no parameters, got {sorted(params)}")
    return table[name]()


def decode_any(blob, center=None) -> np.ndarray:
    """Decode any codec blob by the id in its first byte (TurboQuant parameters come from the blob;
    a centered TurboQuant blob needs the same `center` mean it was encoded with)."""
    cid, _, _, _ = read_header(blob)
    if CODEC_NAMES[cid] == "turboquant":
        from agp.quant.turboquant import decode_blob
        return decode_blob(blob, center)
    return get_codec(CODEC_NAMES[cid]).decode(blob)


def check_blob(blob) -> dict:
    """Validate a codec blob completely (header, parameters, exact body length) without decoding it.

    Returns blob_meta plus the codec's parameters. Raises CodecError naming the problem.
    """
    cid, ver, shape, off = read_header(blob)
    name = CODEC_NAMES[cid]
    meta = {"scheme": name, "codec_id": cid, "version": ver, "shape": shape}
    if name == "turboquant":
        from agp.quant.turboquant import check_blob as tq_check
        return meta | tq_check(blob)
    if ver != 1:
        raise CodecError(f"{name} codec version {ver} is not supported (this build reads version 1)")
    n = int(np.prod(shape))
    if name == "q8_0":
        nblocks = int(np.prod(shape[:-1])) * -(-shape[-1] // Q8_BLOCK)
        expect_len(blob, off, nblocks * Q8_DTYPE.itemsize, "q8_0 blob")
        _finite(np.frombuffer(blob, Q8_DTYPE, nblocks, off)["d"], "q8_0 block scales")
    else:
        dt = "<f4" if name == "f32" else "<f2"
        expect_len(blob, off, n * np.dtype(dt).itemsize, f"{name} blob")
        _finite(np.frombuffer(blob, dt, n, off), f"{name} values")
    return meta


def _finite(a: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise CodecError(f"{what} hold NaN/Inf (first at element {bad}): a hidden state must be finite")


def blob_meta(blob) -> dict:
    """Scheme, version and shape of a codec blob, without decoding its body."""
    cid, ver, shape, _ = read_header(blob)
    return {"scheme": CODEC_NAMES[cid], "codec_id": cid, "version": ver, "shape": shape}
