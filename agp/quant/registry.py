"""The codec registry: one lookup by id (the blob's first byte) for the packet, the bench and the fuzzer.

Each codec class declares its `name`, `codec_id`, `version` and its own `check(blob)`; this module
only collects them. A new codec is a class in agp/quant/ and one entry in CODECS.
"""
from __future__ import annotations

import re

import numpy as np

from agp.errors import AGPError
from agp.quant.codec import F32, FP16, Q8_0, Codec, CodecError, read_header, require_header_bytes
from agp.quant.turboquant import TurboQuant

CODECS: tuple[type[Codec], ...] = (F32, FP16, Q8_0, TurboQuant)
BY_ID = {c.codec_id: c for c in CODECS}
BY_NAME = {c.name: c for c in CODECS}
assert len(BY_ID) == len(BY_NAME) == len(CODECS), "codec ids and names must be unique"
# the bench and fuzzer shorthand for a TurboQuant configuration: tq<bits>[-qjl|-dense|-c]
_TQ_SPEC = re.compile(r"tq([1-8])(-qjl|-dense|-c)?")


def lookup(codec_id: int) -> type[Codec]:
    """The codec class for an id; CodecError for an id no codec declares."""
    if codec_id not in BY_ID:
        raise CodecError(f"unknown codec id {codec_id} at offset 0 (known: {sorted(BY_ID)})")
    return BY_ID[codec_id]


def codec_of(blob) -> type[Codec]:
    """The codec class that wrote `blob`, from its first byte."""
    require_header_bytes(blob)
    return lookup(blob[0])


def check_blob(blob) -> dict:
    """Validate any codec blob completely without decoding it (the codec's own check)."""
    return codec_of(blob).check(blob)


def decode_any(blob, center=None) -> np.ndarray:
    """Decode any codec blob by the id in its first byte (TurboQuant parameters come from the blob;
    a centered TurboQuant blob needs the same `center` mean it was encoded with)."""
    return codec_of(blob).decode_blob(blob, center)


def blob_meta(blob) -> dict:
    """Scheme, version and shape of a codec blob, without decoding its body."""
    cid, ver, shape, _ = read_header(blob)
    codec = lookup(cid)
    return {"scheme": codec.name, "codec_id": cid, "version": ver, "shape": shape}


def versions() -> dict[str, int]:
    """name -> the one byte-format version this build reads and writes."""
    return {c.name: c.version for c in CODECS}


def make_codec(spec: str, dim: int | None = None, seed: int = 0, center=None, **params) -> Codec:
    """A codec from a scheme name (f32, fp16, q8_0; turboquant with TurboQuant's parameters) or the
    bench shorthand tq<bits>[-qjl|-dense|-c] for vectors of length `dim` (-c: quantized around
    `center`, zeros when none is given). `dim`, `seed` and `center` are ignored by codecs without
    parameters, so one spec list serves vectors of any width."""
    tq = _TQ_SPEC.fullmatch(spec)
    if tq:
        if dim is None:
            raise AGPError(f"codec {spec} needs the vector length (dim)")
        variant = tq.group(2) or ""
        if variant == "-c" and center is None:
            center = np.zeros(dim, np.float32)
        return TurboQuant(dim, int(tq.group(1)), seed=seed, qjl=variant == "-qjl",
                          rotation="dense" if variant == "-dense" else "hadamard",
                          center=center if variant == "-c" else None, **params)
    if spec not in BY_NAME:
        raise AGPError(f"unknown codec {spec!r}; use one of {', '.join(BY_NAME)} or tq<bits>[-qjl|-dense|-c]")
    if spec == TurboQuant.name:
        return TurboQuant(**({"dim": dim} if dim is not None else {}), seed=seed, center=center, **params)
    if params:
        raise AGPError(f"codec {spec} takes no parameters, got {sorted(params)}")
    return BY_NAME[spec]()
