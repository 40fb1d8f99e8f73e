"""The codec interface and the self-describing blob every codec writes.

A codec turns an array [..., dim] into bytes and back: ``encode(array) -> bytes``,
``decode(bytes) -> array``, ``.meta`` (scheme, version, parameters). The bytes carry their own
header so a receiver needs nothing else:

    u8  codec id            (each codec's `codec_id`; agp/quant/registry.py looks them up)
    u8  codec version       (each codec's `version`: the byte format its decoder reads)
    u8  ndim (1..4)
    varint * ndim           shape (LEB128, each >= 1, at most MAX_ELEMENTS elements in all)
    ...                     codec parameters and body (see each codec)

Every length the decoder uses is computed from the shape and checked against the bytes actually
present *before* anything is allocated, so a lying header costs nothing (see docs/codecs.md).
Each codec's `check(blob)` runs exactly the checks its decoder runs, without building the array.
"""
from __future__ import annotations

import abc

import numpy as np

from agp.errors import AGPError

HEADER_MIN = 3  # id, version, ndim
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


def require_header_bytes(buf) -> None:
    if len(buf) < HEADER_MIN:
        raise CodecError(f"codec blob of {len(buf)} bytes is shorter than its {HEADER_MIN}-byte header")


def read_header(buf) -> tuple[int, int, tuple[int, ...], int]:
    """Parse (codec id, version, shape, body offset) with every bound checked (the id is the
    registry's to know, the version the codec's: Codec.parse_header checks both)."""
    require_header_bytes(buf)
    cid, ver, ndim = buf[0], buf[1], buf[2]
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
    """Base: subclasses declare `name`, `codec_id` (the blob's first byte) and `version` (the byte
    format their decoder reads), and implement encode/decode and `check`."""

    name = "?"
    codec_id = -1
    version = 1

    @property
    def meta(self) -> dict:
        return {"scheme": self.name, "version": self.version, "codec_id": self.codec_id}

    @classmethod
    def parse_header(cls, blob) -> tuple[tuple[int, ...], int]:
        """(shape, body offset) of one of this codec's blobs; another id or version is refused."""
        cid, ver, shape, off = read_header(blob)
        if cid != cls.codec_id:
            raise CodecError(f"codec id {cid} where {cls.name} was expected (id {cls.codec_id})")
        if ver != cls.version:
            raise CodecError(f"{cls.name} codec version {ver} is not supported (this build reads version {cls.version})")
        return shape, off

    @classmethod
    def blob_meta(cls, shape: tuple[int, ...]) -> dict:
        return {"scheme": cls.name, "codec_id": cls.codec_id, "version": cls.version, "shape": shape}

    @classmethod
    @abc.abstractmethod
    def check(cls, blob) -> dict:
        """Validate a blob completely (header, parameters, exact body length, finite values) without
        decoding it: blob_meta plus the codec's parameters, or CodecError naming the problem."""

    @classmethod
    def decode_blob(cls, blob, center=None) -> np.ndarray:
        """Decode with only what the blob carries (`center`: for codecs that quantize around a mean)."""
        return cls().decode(blob)

    @abc.abstractmethod
    def encode(self, array) -> bytes:
        """Array -> self-describing blob."""

    @abc.abstractmethod
    def decode(self, blob) -> np.ndarray:
        """Blob -> array (rejects malformed blobs with CodecError)."""


class _Raw(Codec):
    """Values stored as they are in `dtype`; decode is a zero-copy view of the bytes."""

    dtype = "<f4"

    @classmethod
    def _values(cls, blob) -> tuple[tuple[int, ...], np.ndarray]:
        shape, off = cls.parse_header(blob)
        n = int(np.prod(shape))
        expect_len(blob, off, np.dtype(cls.dtype).itemsize * n, f"{cls.name} blob")
        values = np.frombuffer(blob, dtype=cls.dtype, count=n, offset=off)
        _finite(values, f"{cls.name} values")
        return shape, values

    @classmethod
    def check(cls, blob) -> dict:
        return cls.blob_meta(cls._values(blob)[0])

    def decode(self, blob) -> np.ndarray:
        shape, values = self._values(blob)
        return values.reshape(shape)


class F32(_Raw):
    """Raw little-endian float32: the lossless reference. Decode is a zero-copy view."""

    name = "f32"
    codec_id = 0
    version = 1
    dtype = "<f4"

    def encode(self, array) -> bytes:
        rows, shape = as_rows(array)
        return write_header(self.codec_id, self.version, shape) + rows.astype("<f4").tobytes()


class FP16(_Raw):
    """IEEE half precision (values beyond ±65504 are refused, never clamped). Decode is a zero-copy float16 view."""

    name = "fp16"
    codec_id = 1
    version = 1
    dtype = "<f2"

    def encode(self, array) -> bytes:
        rows, shape = as_rows(array)
        check_range(rows, FP16_MAX, "fp16", "it is beyond the largest half-precision value")
        return write_header(self.codec_id, self.version, shape) + rows.astype("<f2").tobytes()


Q8_BLOCK = 32
Q8_DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", (Q8_BLOCK,))])  # GGML block_q8_0: 34 bytes


class Q8_0(Codec):
    """GGML q8_0: blocks of 32 values, one fp16 scale d = max|x|/127 and 32 int8 q = round(x/d).

    Rows whose length is not a multiple of 32 are zero-padded to the next block (the padding
    decodes to zeros and is dropped). Byte layout is exactly GGML's block_q8_0 array.
    """

    name = "q8_0"
    codec_id = 2
    version = 1

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
        return write_header(self.codec_id, self.version, shape) + blocks.tobytes()

    @classmethod
    def _blocks(cls, blob) -> tuple[tuple[int, ...], np.ndarray]:
        shape, off = cls.parse_header(blob)
        count = int(np.prod(shape[:-1])) * -(-shape[-1] // Q8_BLOCK)
        expect_len(blob, off, count * Q8_DTYPE.itemsize, "q8_0 blob")
        blocks = np.frombuffer(blob, dtype=Q8_DTYPE, count=count, offset=off)
        _finite(blocks["d"], "q8_0 block scales")
        return shape, blocks

    @classmethod
    def check(cls, blob) -> dict:
        return cls.blob_meta(cls._blocks(blob)[0])

    def decode(self, blob) -> np.ndarray:
        shape, blocks = self._blocks(blob)
        d = shape[-1]
        n = int(np.prod(shape[:-1]))
        x = blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
        return x.reshape(n, -(-d // Q8_BLOCK) * Q8_BLOCK)[:, :d].reshape(shape)


def _finite(a: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise CodecError(f"{what} hold NaN/Inf (first at element {bad}): a hidden state must be finite")
