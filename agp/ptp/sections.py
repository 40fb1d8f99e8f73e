"""The five AGP-PTP sections: dataclasses with exact, range-checked pack/unpack (layouts: docs/ptp.md §2)."""
from __future__ import annotations

import hashlib
import math
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from agp.errors import AGPError
from agp.ptp.errors import CodecVersionMismatch, MalformedSection, UnknownCodec
from agp.quant import codec as qcodec
from agp.quant import registry

SECTION_NAMES = ("identity", "trajectory", "vitality", "semantic", "payload")
QUANTIZATIONS = ("f32", "bf16", "f16", "q8_0", "q4_k_m", "mlx-q4", "mlx-q8")
_HOST = re.compile(rb"[!-~]{1,64}")  # printable ASCII, no spaces
_F16_MAX = 65504.0


def fingerprint8(fp: str | bytes) -> bytes:
    """The 8 bytes a packet carries for a fingerprint: a hex sha256 string's first 8 bytes, else sha256(fp)[:8]."""
    if isinstance(fp, bytes):
        return fp if len(fp) == 8 else hashlib.sha256(fp).digest()[:8]
    try:
        raw = bytes.fromhex(fp)
        if len(raw) >= 8:
            return raw[:8]
    except ValueError:
        pass
    return hashlib.sha256(fp.encode()).digest()[:8]


def host_id(host: str | bytes) -> bytes:
    """The 4 bytes a packet carries for a host: sha256(name)[:4] (4 raw bytes pass through).

    Fixed-size ids keep the identity section fixed-size (and the packet small whatever the names);
    a receiver only needs equality with its own id. Names: 1..64 printable ASCII, no spaces.
    """
    if isinstance(host, bytes) and len(host) == 4:
        return host
    h = host.encode("ascii", "replace") if isinstance(host, str) else bytes(host)
    if not _HOST.fullmatch(h):
        raise AGPError(f"host name {host!r} must be 1..64 printable ASCII characters without spaces")
    return hashlib.sha256(h).digest()[:4]


def _f16(values, what: str) -> bytes:
    a = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any(np.abs(a) > _F16_MAX):
        raise AGPError(f"{what} must be finite and within ±{_F16_MAX:g} (fp16 on the wire), got {a.tolist()}")
    return a.astype("<f2").tobytes()


def _read_f16(buf, off: int, n: int, section: str) -> tuple:
    # a handful of values: struct is several times cheaper than building a NumPy array
    vals = struct.unpack_from(f"<{n}e", buf, off)
    if not all(map(math.isfinite, vals)):
        raise MalformedSection(f"non-finite f16 value in {section} section", section)
    return vals


def _exact(buf, need: int, section: str) -> None:
    if len(buf) != need:
        raise MalformedSection(f"{section} section is {len(buf)} bytes, its fields need {need}", section)


@dataclass
class Identity:
    """Who made the state and where it goes (section 0)."""

    model_fp: bytes
    tokenizer_fp: bytes
    quantization: str
    session_id: int
    span_start: int
    span_len: int
    layer: int
    seq: int
    source_host: str
    target_host: str

    _FMT = struct.Struct("<8s8sBQIHHI4s4s")  # 45 bytes, fixed

    def __post_init__(self):
        # keep the wire form: fingerprints become their first 8 bytes, host names their 4-byte ids
        self.model_fp, self.tokenizer_fp = fingerprint8(self.model_fp), fingerprint8(self.tokenizer_fp)
        self.source_host, self.target_host = host_id(self.source_host), host_id(self.target_host)

    def pack(self) -> bytes:
        if self.quantization not in QUANTIZATIONS:
            raise AGPError(f"unknown quantization {self.quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
        if not 1 <= self.span_len < 2**16 or not 0 <= self.span_start < 2**32:
            raise AGPError(f"token span start={self.span_start} len={self.span_len} out of range (len 1..65535)")
        try:
            return self._FMT.pack(self.model_fp, self.tokenizer_fp, QUANTIZATIONS.index(self.quantization),
                                  self.session_id, self.span_start, self.span_len, self.layer, self.seq,
                                  self.source_host, self.target_host)
        except struct.error as e:
            raise AGPError(f"identity field out of range ({e}): session u64, layer u16, seq u32") from None

    @classmethod
    def unpack(cls, buf) -> Identity:
        s = "identity"
        _exact(buf, cls._FMT.size, s)
        mfp, tfp, q, sess, start, span, layer, seq, src, dst = cls._FMT.unpack_from(buf, 0)
        if q >= len(QUANTIZATIONS):
            raise MalformedSection(f"unknown quantization code {q} at identity offset 16", s)
        if span < 1:
            raise MalformedSection("token span length 0 at identity offset 29", s)
        return cls(bytes(mfp), bytes(tfp), QUANTIZATIONS[q], sess, start, span, layer, seq, bytes(src), bytes(dst))


@dataclass
class Trajectory:
    """Controller's view of the state's trajectory (section 1); eight fp16 scores."""

    commitment: float = 0.0
    uncertainty: float = 0.0
    transition_pressure: float = 0.0
    recovery_margin: float = 0.0
    phase_stiffness: float = 0.0
    novelty: float = 0.0
    stability: float = 0.0
    route_confidence: float = 0.0

    FIELDS = ("commitment", "uncertainty", "transition_pressure", "recovery_margin", "phase_stiffness",
              "novelty", "stability", "route_confidence")

    def pack(self) -> bytes:
        return _f16([getattr(self, f) for f in self.FIELDS], "trajectory values")

    @classmethod
    def unpack(cls, buf) -> Trajectory:
        _exact(buf, 16, "trajectory")
        return cls(*(float(v) for v in _read_f16(buf, 0, 8, "trajectory")))


DEAD_FLAGS = ("dead", "weak", "revive_needed", "saturated")


@dataclass
class Vitality:
    """Health of the state (section 2): five fp16 surrogates and the dead-state flags."""

    hidden_norm: float = 0.0
    entropy_surrogate: float = 0.0
    sparsity_surrogate: float = 0.0
    semantic_confidence: float = 0.0
    early_exit_confidence: float = 0.0
    flags: frozenset = frozenset()

    FIELDS = ("hidden_norm", "entropy_surrogate", "sparsity_surrogate", "semantic_confidence", "early_exit_confidence")

    def pack(self) -> bytes:
        bad = set(self.flags) - set(DEAD_FLAGS)
        if bad:
            raise AGPError(f"unknown vitality flags {sorted(bad)}; use {', '.join(DEAD_FLAGS)}")
        bits = sum(1 << DEAD_FLAGS.index(f) for f in self.flags)
        return _f16([getattr(self, f) for f in self.FIELDS], "vitality values") + bytes((bits,))

    @classmethod
    def unpack(cls, buf) -> Vitality:
        _exact(buf, 11, "vitality")
        vals = _read_f16(buf, 0, 5, "vitality")
        bits = buf[10]
        if bits >> len(DEAD_FLAGS):
            raise MalformedSection(f"reserved dead-state flag bits set (0x{bits:02x}) at vitality offset 10", "vitality")
        return cls(*(float(v) for v in vals), flags=frozenset(f for i, f in enumerate(DEAD_FLAGS) if bits >> i & 1))


PRIM = np.dtype([("id", "<u2"), ("act", "<f2")])
BUNDLE = np.dtype([("id", "<u4"), ("score", "<f2")])


def _entries(items, dtype, what: str) -> np.ndarray:
    a = np.zeros(len(items), dtype)
    if len(items):
        ids, vals = zip(*items) if not isinstance(items, np.ndarray) else (items[dtype.names[0]], items[dtype.names[1]])
        ids = np.asarray(ids, np.int64)
        if ids.min() < 0 or ids.max() >= 2 ** (8 * dtype[0].itemsize) or np.any(np.diff(ids) <= 0):
            raise AGPError(f"{what} ids must be strictly increasing and fit in {8 * dtype[0].itemsize} bits, got {ids.tolist()}")
        a[dtype.names[0]] = ids
        a[dtype.names[1]] = np.frombuffer(_f16(vals, f"{what} values"), "<f2")
    if len(a) > 255:
        raise AGPError(f"at most 255 {what} entries fit in a packet, got {len(a)}")
    return a


@dataclass
class Semantic:
    """Sparse semantic view (section 3): (id, activation) lists, nearest bundles, mismatch risk."""

    primitives: object = ()   # [(id, act)] or structured array PRIM, ids strictly increasing
    invariants: object = ()   # same layout as primitives
    bundles: object = ()      # [(bundle id, score)] or structured array BUNDLE
    mismatch_risk: float = 0.0

    def pack(self) -> bytes:
        p = _entries(self.primitives, PRIM, "primitive")
        i = _entries(self.invariants, PRIM, "invariant")
        b = _entries(self.bundles, BUNDLE, "bundle")
        return bytes((len(p), len(i), len(b))) + _f16([self.mismatch_risk], "mismatch_risk") + \
            p.tobytes() + i.tobytes() + b.tobytes()

    @classmethod
    def unpack(cls, buf) -> Semantic:
        s = "semantic"
        if len(buf) < 5:
            raise MalformedSection(f"semantic section is {len(buf)} bytes, shorter than its 5-byte minimum", s)
        np_, ni, nb = buf[0], buf[1], buf[2]
        _exact(buf, 5 + 4 * np_ + 4 * ni + 6 * nb, s)
        risk = float(_read_f16(buf, 3, 1, s)[0])
        off, lists = 5, []
        for n, dt, what in ((np_, PRIM, "primitive"), (ni, PRIM, "invariant"), (nb, BUNDLE, "bundle")):
            a = np.frombuffer(buf, dt, n, off)  # zero-copy view
            if n == 0:
                lists.append(a)
                continue
            if n > 1 and np.any(np.diff(a["id"].astype(np.int64)) <= 0):
                raise MalformedSection(f"{what} ids not strictly increasing at semantic offset {off}", s)
            if not np.all(np.isfinite(a[dt.names[1]])):
                raise MalformedSection(f"non-finite {what} value at semantic offset {off}", s)
            lists.append(a)
            off += n * dt.itemsize
        return cls(*lists, mismatch_risk=risk)

    def same_as(self, other: Semantic) -> bool:
        return self.pack() == other.pack()


@dataclass
class Payload:
    """The moved state (section 4): a codec blob of the residual [span_len, d], optional KV summary and hint."""

    residual: bytes
    kv_summary: bytes | None = None
    hint: tuple[float, float] | None = None  # (expected reconstruction cosine, norm scale)
    meta: dict = field(default_factory=dict, compare=False)
    kv_meta: dict | None = field(default=None, compare=False)

    def pack(self) -> bytes:
        flags = (1 if self.hint is not None else 0) | (2 if self.kv_summary is not None else 0)
        parts = [bytes((flags,))]
        if self.hint is not None:
            parts.append(_f16(self.hint, "reconstruction hint"))
        if self.kv_summary is not None:
            parts += [qcodec.write_varint(len(self.kv_summary)), bytes(self.kv_summary)]
        if not self.residual:
            raise AGPError("payload residual is empty: encode the hidden state with a codec first")
        # the sender checks what every receiver checks: a blob its own decoder rejects is never sent
        for blob in (self.residual, self.kv_summary):
            if blob is not None:
                registry.check_blob(blob)
        parts.append(bytes(self.residual))
        return b"".join(parts)

    @classmethod
    def unpack(cls, buf) -> Payload:
        s = "payload"
        if len(buf) < 1:
            raise MalformedSection("empty payload section", s)
        flags, off = buf[0], 1
        if flags & ~3:
            raise MalformedSection(f"reserved payload flag bits set (0x{flags:02x}) at payload offset 0", s)
        hint = kv = None
        if flags & 1:
            if len(buf) < off + 4:
                raise MalformedSection("payload ends inside the reconstruction hint", s)
            hint = tuple(float(v) for v in _read_f16(buf, off, 2, s))
            off += 4
        if flags & 2:
            try:
                n, off = qcodec.read_varint(buf, off, "kv summary length", max_bytes=4)
            except qcodec.CodecError as e:
                raise MalformedSection(str(e), s) from None
            if n < 1 or off + n > len(buf):
                raise MalformedSection(f"kv summary claims {n} bytes, {len(buf) - off} remain in the payload", s)
            kv = buf[off: off + n]
            off += n
        residual = buf[off:]
        out = cls(residual, kv, hint, check_blob(residual, "residual"))
        if kv is not None:
            out.kv_meta = check_blob(kv, "kv summary")
        return out

    def array(self, center=None) -> np.ndarray:
        """The residual as an array (zero-copy view for f32/fp16; TurboQuant reconstructs, adding
        `center` back when the blob is centered — Receiver.state picks the right one)."""
        return registry.decode_any(self.residual, center)


def check_blob(blob, what: str) -> dict:
    """Validate a codec blob completely without decoding it; typed errors for unknown codecs."""
    if len(blob) >= 1 and blob[0] not in registry.BY_ID:
        raise UnknownCodec(f"{what} uses unknown codec id {blob[0]} (known: {sorted(registry.BY_ID)})", "payload")
    if len(blob) >= 2 and blob[1] != registry.BY_ID[blob[0]].version:
        codec = registry.BY_ID[blob[0]]
        raise CodecVersionMismatch(f"{what} codec {codec.name} version {blob[1]}; this build decodes version "
                                   f"{codec.version}", "payload")
    try:
        return registry.check_blob(blob)
    except qcodec.CodecError as e:
        raise MalformedSection(f"{what}: {e}", "payload") from None


@dataclass
class Packet:
    """A decoded (or to-be-encoded) AGP-PTP v1 packet."""

    identity: Identity
    payload: Payload
    trajectory: Trajectory | None = None
    vitality: Vitality | None = None
    semantic: Semantic | None = None
    loopback: bool = False

    def sections(self) -> list:
        return [self.identity, self.trajectory, self.vitality, self.semantic, self.payload]
