"""TurboQuant (Zandieh et al., 2025): near-optimal vector quantization by rotation + scalar Lloyd-Max.

x -> (||x||, codes): the unit vector x/||x|| is rotated by a seeded orthogonal map (see rotation.py),
every rotated coordinate is quantized with one Lloyd-Max codebook for the rotated-coordinate
density (lloyd_max.py), and the codes are bit-packed (bitpack.py). The norm is kept separately as
float32. Decoding looks the levels up, un-rotates and rescales.

With ``qjl=True`` (the paper's TurboQuant_prod) the budget of ``bits`` per coordinate is split:
``bits - 1`` for the MSE quantizer and 1 for a QJL sign sketch of the residual
r = y - Q(y): signs = sign(S r) with S an i.i.d. Gaussian [d, d] matrix, plus ||r||. The
reconstruction adds sqrt(pi/2)/d * ||r|| * S^T signs, which makes inner-product estimates
<q, x_hat> unbiased (the MSE-only quantizer shrinks them slightly).

With ``center`` (a mean vector both ends hold, e.g. a per-layer mean of the backbone's states)
x - center is quantized instead of x. Gemma's residual stream has a massive channel shared by all
tokens; quantizing around it cuts the error on the token-specific part ~10x at the same bytes
(docs/codecs.md). The blob names the mean by a 16-bit id and decoding with another mean fails.

Blob body after the common header (codec.py), all little-endian:

    u8   flags: bits (low 4), bit 4 qjl, bit 5 dense rotation, bit 6 custom codebook, bit 7 centered
    varint seed             (LEB128, < 2**32)
    u16  center id                 only when centered (see `center` below)
    f32 * 2**mse_bits          only with a custom codebook
    f32 * N                    norms
    f32 * N                    residual norms (qjl only)
    u8  * N * ceil(pd*mse_bits/8)   packed codes (pd = padded dim)
    u8  * N * ceil(pd/8)       QJL signs (qjl only)
"""
from __future__ import annotations

import functools
import struct
import zlib
import numpy as np

from agp.errors import AGPError
from agp.quant import bitpack, lloyd_max
from agp.quant.codec import Codec, CodecError, CodecRangeError, as_rows, expect_len, read_varint, write_header, write_varint
from agp.quant.rotation import Rotation

VERSION = 1
BITS = (1, 2, 3, 4, 5, 6, 7, 8)
MAX_DIM = 1 << 16
MAX_DENSE_DIM = 4096  # dense rotation and the QJL matrix are d x d floats: bound what a blob can demand
F_QJL, F_DENSE, F_CODEBOOK, F_CENTER = 0x10, 0x20, 0x40, 0x80


def center_id(center: np.ndarray) -> int:
    """16-bit id of a centering mean (low bits of CRC-32 of its float32 bytes): both ends must hold the same mean."""
    return zlib.crc32(np.ascontiguousarray(center, dtype="<f4").tobytes()) & 0xFFFF


class TurboQuant(Codec):
    """TurboQuant codec for vectors of length `dim` at `bits` bits per coordinate."""

    name = "turboquant"
    codec_id = 3
    version = VERSION

    def __init__(self, dim: int, bits: int = 4, seed: int = 0, codebook=None, qjl: bool = False,
                 rotation: str = "hadamard", center=None):
        if not isinstance(dim, (int, np.integer)) or not 2 <= dim <= MAX_DIM:
            raise AGPError(f"TurboQuant dim must be an integer in 2..{MAX_DIM}, got {dim!r}")
        if bits not in BITS or (qjl and bits < 2):
            raise AGPError(f"TurboQuant bits must be in 1..8 (>= 2 with qjl: one bit goes to the residual), got {bits!r}")
        if not 0 <= int(seed) < 2**32:
            raise AGPError(f"TurboQuant seed must fit in 32 bits, got {seed}")
        if (rotation == "dense" or qjl) and dim > MAX_DENSE_DIM:
            raise AGPError(f"dense rotation / QJL need a d x d matrix: dim {dim} > {MAX_DENSE_DIM}; use hadamard without qjl")
        self.dim, self.bits, self.seed, self.qjl = int(dim), int(bits), int(seed), bool(qjl)
        self.mse_bits = self.bits - 1 if self.qjl else self.bits
        self.rotation = Rotation(self.dim, self.seed, rotation)
        self.padded_dim = self.rotation.padded_dim
        self.custom_codebook = codebook is not None
        if codebook is None:
            self.codebook = lloyd_max.gaussian_codebook(self.mse_bits, self.padded_dim)
        else:
            cb = np.sort(np.asarray(codebook, dtype=np.float32).ravel())
            if cb.shape != (1 << self.mse_bits,) or not np.all(np.isfinite(cb)):
                raise AGPError(f"codebook must hold {1 << self.mse_bits} finite levels for {self.mse_bits} bits, got {cb.shape}")
            self.codebook = cb
        self._bounds = lloyd_max.boundaries(self.codebook)
        self.code_bytes = bitpack.packed_size(self.padded_dim, self.mse_bits)
        self.sign_bytes = bitpack.packed_size(self.padded_dim, 1) if self.qjl else 0
        self._qjl_matrix = None
        self.center = None
        if center is not None:
            c = np.asarray(center, dtype=np.float32)
            if c.shape != (self.dim,) or not np.all(np.isfinite(c)):
                raise AGPError(f"center must be a finite vector [{self.dim}], got shape {c.shape}")
            self.center = c
        self.center_id = None if self.center is None else center_id(self.center)

    # -- parameters -------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return {**super().meta, "dim": self.dim, "padded_dim": self.padded_dim, "bits": self.bits,
                "mse_bits": self.mse_bits, "qjl": self.qjl, "seed": self.seed,
                "rotation": self.rotation.kind, "custom_codebook": self.custom_codebook,
                "center_id": self.center_id}

    @property
    def row_bytes(self) -> int:
        """Bytes per encoded vector: codes, signs and the float32 norm(s)."""
        return self.code_bytes + self.sign_bytes + 4 * (2 if self.qjl else 1)

    @property
    def qjl_matrix(self) -> np.ndarray:
        if self._qjl_matrix is None:
            rng = np.random.default_rng([0x0A11, self.seed, self.padded_dim])
            self._qjl_matrix = rng.standard_normal((self.padded_dim, self.padded_dim), dtype=np.float32)
        return self._qjl_matrix

    # -- batch API (used by the index) ----------------------------------------------------------
    def rotate(self, x: np.ndarray) -> np.ndarray:
        """Rotate rows [N, dim] into the quantization domain [N, padded_dim] (e.g. a query)."""
        return self.rotation.apply(x)

    def encode_batch(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, dim] -> (packed [N, code_bytes (+ sign_bytes with qjl)] uint8, norms float32).

        norms is [N] (vector norms), or [N, 2] (norm, residual norm) with qjl.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise AGPError(f"TurboQuant(dim={self.dim}).encode_batch expects [N, {self.dim}], got {x.shape}")
        if self.center is not None:
            x = x - self.center
        with np.errstate(over="ignore"):   # an overflowing norm is refused just below
            norms = np.linalg.norm(x, axis=1).astype(np.float32)
        if not np.all(np.isfinite(norms)):
            row = int(np.flatnonzero(~np.isfinite(norms))[0])
            raise CodecRangeError(f"turboquant cannot encode row {row}: its norm overflows float32 (values up to "
                                  f"{float(np.abs(x[row]).max()):.3g}); scale the array down or use the f32 codec")
        unit = x / np.where(norms > 0, norms, 1)[:, None]
        y = self.rotation.apply(unit)
        idx = lloyd_max.quantize(y, self.codebook, self._bounds)
        packed = bitpack.pack(idx, self.mse_bits)
        if not self.qjl:
            return packed, norms
        r = y - self.codebook[idx]
        gamma = np.linalg.norm(r, axis=1).astype(np.float32)
        signs = bitpack.pack((r @ self.qjl_matrix.T >= 0).astype(np.uint8), 1)
        return np.concatenate([packed, signs], axis=1), np.stack([norms, gamma], axis=1)

    def decode_rotated(self, packed: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
        """Reconstruction in the rotated domain [N, padded_dim]; unit scale unless `norms` is given."""
        packed = np.asarray(packed, dtype=np.uint8)
        if packed.ndim != 2 or packed.shape[1] != self.code_bytes + self.sign_bytes:
            raise AGPError(f"packed codes must be [N, {self.code_bytes + self.sign_bytes}], got {packed.shape}")
        idx = bitpack.unpack(packed[:, : self.code_bytes], self.mse_bits, self.padded_dim)
        y = self.codebook[idx]
        nrm = None if norms is None else np.asarray(norms, dtype=np.float32).reshape(len(packed), -1)
        if self.qjl:
            if nrm is None or nrm.shape[1] != 2:
                raise AGPError("qjl decoding needs norms [N, 2] (norm, residual norm) from encode_batch")
            z = bitpack.unpack(packed[:, self.code_bytes:], 1, self.padded_dim).astype(np.float32) * 2 - 1
            scale = np.float32(np.sqrt(np.pi / 2) / self.padded_dim) * nrm[:, 1:2]
            y = y + scale * (z @ self.qjl_matrix)
        if nrm is not None:
            y = y * nrm[:, 0:1]
        return y.astype(np.float32, copy=False)

    def decode_batch(self, packed: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """(packed, norms) from encode_batch -> [N, dim] float32 (the center added back, if any)."""
        x = self.rotation.invert(self.decode_rotated(packed, norms))
        return x if self.center is None else x + self.center

    # -- single-array codec -------------------------------------------------------------------------
    def _flags(self) -> int:
        return (self.bits | (F_QJL if self.qjl else 0) | (F_DENSE if self.rotation.kind == "dense" else 0)
                | (F_CODEBOOK if self.custom_codebook else 0) | (F_CENTER if self.center is not None else 0))

    def encode(self, array) -> bytes:
        """Array [..., dim] -> self-describing bytes (header, parameters, norms, codes)."""
        rows, shape = as_rows(array)
        if shape[-1] != self.dim:
            raise AGPError(f"TurboQuant(dim={self.dim}) cannot encode an array whose last dimension is {shape[-1]}")
        packed, norms = self.encode_batch(rows)
        parts = [write_header(self.codec_id, self.version, shape), bytes((self._flags(),)) + write_varint(self.seed)]
        if self.center is not None:
            parts.append(struct.pack("<H", self.center_id))
        if self.custom_codebook:
            parts.append(self.codebook.astype("<f4").tobytes())
        norms = norms.reshape(len(rows), -1)
        parts += [np.ascontiguousarray(norms.T).astype("<f4").tobytes(), packed.tobytes()]
        return b"".join(parts)

    def decode(self, blob) -> np.ndarray:
        """Bytes from `encode` -> float32 array; the blob's parameters must match this codec's."""
        return _decode(blob, self)

    @classmethod
    def check(cls, blob) -> dict:
        """Validate a TurboQuant blob fully without decoding; blob_meta plus its parameters."""
        layout = _layout(blob)
        return cls.blob_meta(layout["shape"]) | {k: layout[k] for k in ("shape", "dim", "bits", "seed", "qjl",
                                                                         "rotation", "center_id")} | \
            {"custom_codebook": layout["codebook"] is not None}

    @classmethod
    def decode_blob(cls, blob, center=None) -> np.ndarray:
        """Decode using only the parameters the blob carries (and `center` if it is centered)."""
        return _decode(blob, None, center)


def _parse_params(blob):
    shape, off = TurboQuant.parse_header(blob)
    if len(blob) < off + 2:
        raise CodecError(f"truncated turboquant parameters at offset {off}")
    flags = blob[off]
    seed, end = read_varint(blob, off + 1, "turboquant seed")
    if seed >= 2**32:
        raise CodecError(f"turboquant seed at offset {off + 1} does not fit in 32 bits")
    bits = flags & 0x0F
    if bits not in BITS or (flags & F_QJL and bits < 2):
        raise CodecError(f"invalid turboquant flags 0x{flags:02x} at offset {off}")
    dim = shape[-1]
    if not 2 <= dim <= MAX_DIM or ((flags & (F_QJL | F_DENSE)) and dim > MAX_DENSE_DIM):
        raise CodecError(f"turboquant vector length {dim} is outside the supported range")
    cid = None
    if flags & F_CENTER:
        if len(blob) < end + 2:
            raise CodecError(f"truncated turboquant center id at offset {end}")
        (cid,) = struct.unpack_from("<H", blob, end)
        end += 2
    return shape, flags, seed, cid, end


@functools.lru_cache(maxsize=16)
def _cached(dim: int, bits: int, seed: int, qjl: bool, rotation: str) -> TurboQuant:
    return TurboQuant(dim, bits, seed, qjl=qjl, rotation=rotation)


def _layout(blob) -> dict:
    """Parse and size-check a TurboQuant blob (no heavy objects built); returns its parameters and views."""
    shape, flags, seed, cid, off = _parse_params(blob)
    bits, qjl = flags & 0x0F, bool(flags & F_QJL)
    rot = "dense" if flags & F_DENSE else "hadamard"
    dim, n = shape[-1], int(np.prod(shape[:-1]))
    mse_bits = bits - 1 if qjl else bits
    # the padded dim follows from dim alone; compute sizes and check them before building anything
    pd = dim if rot == "dense" else Rotation.padded_dim_for(dim)
    cb_bytes = 4 * (1 << mse_bits) if flags & F_CODEBOOK else 0
    code_bytes = bitpack.packed_size(pd, mse_bits) + (bitpack.packed_size(pd, 1) if qjl else 0)
    k = 2 if qjl else 1
    expect_len(blob, off, cb_bytes + n * (4 * k + code_bytes), "turboquant blob")
    codebook = None
    if cb_bytes:
        codebook = np.frombuffer(blob, "<f4", 1 << mse_bits, off)
        off += cb_bytes
        if not np.all(np.isfinite(codebook)) or np.any(np.diff(codebook) < 0):
            raise CodecError("turboquant custom codebook holds non-finite or unsorted levels")
    norms = np.frombuffer(blob, "<f4", n * k, off).reshape(k, n).T
    off += 4 * n * k
    if not np.all(np.isfinite(norms)) or np.any(norms < 0):
        raise CodecError("turboquant norms are negative or non-finite: corrupt blob")
    packed = np.frombuffer(blob, np.uint8, n * code_bytes, off).reshape(n, code_bytes)
    return dict(shape=shape, dim=dim, bits=bits, seed=seed, qjl=qjl, rotation=rot, codebook=codebook,
                norms=norms, packed=packed, center_id=cid)


def _decode(blob, tq: TurboQuant | None, center=None) -> np.ndarray:
    lay = _layout(blob)
    dim, bits, seed, qjl, rot, codebook = (lay[k] for k in ("dim", "bits", "seed", "qjl", "rotation", "codebook"))
    if tq is not None:
        if (tq.dim, tq.bits, tq.seed, tq.qjl, tq.rotation.kind) != (dim, bits, seed, qjl, rot) or \
                (codebook is not None and not np.array_equal(codebook, tq.codebook)) or \
                (codebook is None and tq.custom_codebook):
            raise CodecError(f"turboquant blob parameters (dim={dim}, bits={bits}, seed={seed}, qjl={qjl}, "
                             f"rotation={rot}) do not match this codec ({tq.dim}, {tq.bits}, {tq.seed}, {tq.qjl}, "
                             f"{tq.rotation.kind})")
        center = tq.center
    cid = lay["center_id"]
    if cid is not None and center is None:
        raise CodecError(f"turboquant blob is centered on mean {cid:#06x}: decode it with that mean (center=...)")
    if cid is None and center is not None:
        raise CodecError("turboquant blob is not centered but a center was given: the sender and receiver disagree")
    if center is not None and np.shape(center) != (dim,):
        raise CodecError(f"centering mean has shape {np.shape(center)}, the blob's vectors have length {dim}")
    if cid is not None and center_id(center) != cid:
        raise CodecError(f"turboquant blob is centered on mean {cid:#06x}, the mean given is {center_id(center):#06x}")
    if codebook is not None:
        tq = TurboQuant(dim, bits, seed, codebook=codebook, qjl=qjl, rotation=rot)
    else:
        tq = _cached(dim, bits, seed, qjl, rot)
    norms = lay["norms"]
    x = tq.decode_batch(lay["packed"], norms if qjl else norms[:, 0])
    if center is not None:
        x += np.asarray(center, dtype=np.float32)
    return x.reshape(lay["shape"])


def decode_blob(blob, center=None) -> np.ndarray:
    """Decode a TurboQuant blob using only the parameters it carries (and `center` if it is centered)."""
    return TurboQuant.decode_blob(blob, center)


def mse_bound(bits: int) -> tuple[float, float]:
    """(lower, upper) bounds on E||x - x_hat||^2 for a unit vector at `bits` bits (paper, Thm 1 and 3).

    Upper: sqrt(3)*pi/2 * 4**-bits (the paper also tabulates ~0.36, 0.117, 0.03, 0.009 for b = 1..4);
    lower (any quantizer): 4**-bits.
    """
    return 4.0 ** -bits, np.sqrt(3) * np.pi / 2 * 4.0 ** -bits
