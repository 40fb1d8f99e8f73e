"""`.tqidx` snapshot: versioned header + 64-byte-aligned sections, crc32 per block, mmap on open.

Layout (all little-endian; spec in docs/index.md):

    0   8   magic b"AGPTQIDX"
    8   4   u32 format version (VERSION)
    12  4   u32 header length H
    16  4   u32 crc32 of the header bytes
    20  H   header: UTF-8 JSON (dim, padded_dim, bits, seed, rotation, count, store, block_bytes,
            sections: name -> {offset, nbytes, dtype, shape, crc32: [one per block]})
    ... sections, each starting on a 64-byte boundary: mean f32[dim], codebook f32[pd, 2**bits],
        scale f16[N], codes u8[N, code_bytes], vectors f16|f32[N, dim] (only with a rerank store),
        fastscan u8[layout bytes] (version 2: FAISS's blocked fast-scan codes, so open need not re-pack)

Opening maps the file read-only and returns NumPy views into the map (no copy); `verify=True`
checks every block's crc32 first, so a truncated or corrupted file is an error naming the
section and byte offset, never a silently wrong index.
"""
from __future__ import annotations

import json
import mmap
import struct
import zlib
from pathlib import Path

import numpy as np

from agp.errors import AGPError
from agp.io import atomic_path

MAGIC = b"AGPTQIDX"
VERSION = 2   # 2 adds the optional `fastscan` section; version 1 files (without it) still open
PREFIX = struct.Struct("<8sIII")
ALIGN = 64
BLOCK_BYTES = 1 << 20
MAX_HEADER = 1 << 24
SECTIONS = ("mean", "codebook", "scale", "codes", "vectors", "fastscan")


def _crcs(buf, block: int) -> list[int]:
    mv = memoryview(buf).cast("B")
    return [zlib.crc32(mv[i:i + block]) for i in range(0, len(mv), block)] or [zlib.crc32(b"")]


def write(path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write a snapshot: `meta` fields go in the header, `arrays` become sections."""
    path = Path(path)
    specs, offset = {}, 0
    blobs = []
    for name in SECTIONS:
        if name not in arrays:
            continue
        a = np.ascontiguousarray(arrays[name])
        specs[name] = {"offset": offset, "nbytes": int(a.nbytes), "dtype": a.dtype.str, "shape": list(a.shape),
                       "crc32": _crcs(a, BLOCK_BYTES)}
        blobs.append(a)
        offset += -(-a.nbytes // ALIGN) * ALIGN
    header = {**meta, "block_bytes": BLOCK_BYTES, "sections": specs}
    hb = json.dumps(header, sort_keys=True).encode()
    start = -(-(PREFIX.size + len(hb)) // ALIGN) * ALIGN
    if path.is_dir():
        raise AGPError(f"{path} is a directory; give a file path for the snapshot (e.g. {path / 'index.tqidx'})")
    try:
        _write_file(path, hb, specs, blobs, start, offset)
    except OSError as e:
        raise AGPError(f"{path}: cannot write the snapshot ({e.strerror or e}); choose a writable file path") from None


def is_snapshot(path) -> bool:
    """True if `path` is a file that starts with the .tqidx magic (something `agp index` wrote)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _write_file(path: Path, hb: bytes, specs: dict, blobs: list, start: int, offset: int) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(PREFIX.pack(MAGIC, VERSION, len(hb), zlib.crc32(hb)))
            f.write(hb)
            for name, a in zip(specs, blobs):
                f.seek(start + specs[name]["offset"])
                f.write(memoryview(a).cast("B"))
            f.truncate(start + offset)
            f.flush()
            import os
            os.fsync(f.fileno())


SECTION_DTYPES = {"mean": ("<f4",), "codebook": ("<f4",), "scale": ("<f2",), "codes": ("|u1",),
                  "vectors": ("<f2", "<f4"), "fastscan": ("|u1",)}
MIN_BLOCK, MAX_BLOCK = 1 << 12, 1 << 30   # crc32 block sizes a reader accepts (the writer uses BLOCK_BYTES)


def header_problem(meta) -> str | None:
    """What makes a parsed header unusable (None if every section is well-formed): a header whose
    CRC was recomputed after an edit must still describe sections that match their bytes."""
    if not isinstance(meta, dict) or not isinstance(meta.get("sections"), dict):
        return "no sections object"
    block = meta.get("block_bytes")
    if type(block) is not int or not MIN_BLOCK <= block <= MAX_BLOCK or block & (block - 1):
        return f"block_bytes {block!r} is not a power of two in {MIN_BLOCK}..{MAX_BLOCK}"
    end = 0
    for name, spec in sorted(meta["sections"].items(), key=lambda kv: _offset(kv[1])):
        problem = _section_problem(name, spec, block)
        if problem:
            return problem
        if spec["offset"] < end:
            return f"section '{name}' overlaps the previous one"
        end = spec["offset"] + spec["nbytes"]
    return None


def _offset(spec) -> int:
    return spec.get("offset", 0) if isinstance(spec, dict) and type(spec.get("offset")) is int else 0


def _section_problem(name: str, spec, block: int) -> str | None:
    if name not in SECTION_DTYPES or not isinstance(spec, dict):
        return f"unknown section {name!r}"
    offset, nbytes, shape, crcs = spec.get("offset"), spec.get("nbytes"), spec.get("shape"), spec.get("crc32")
    if type(offset) is not int or offset < 0 or offset % ALIGN or type(nbytes) is not int or nbytes < 0:
        return f"section '{name}' offset/nbytes {offset!r}/{nbytes!r} are not aligned non-negative integers"
    if spec.get("dtype") not in SECTION_DTYPES[name]:
        return f"section '{name}' dtype {spec.get('dtype')!r} is not one of {SECTION_DTYPES[name]}"
    if not isinstance(shape, list) or not shape or any(type(d) is not int or d < 0 for d in shape):
        return f"section '{name}' shape {shape!r} is not a list of non-negative integers"
    if int(np.prod(shape, dtype=object)) * np.dtype(spec["dtype"]).itemsize != nbytes:
        return f"section '{name}' shape {shape} does not match its {nbytes} bytes"
    if not isinstance(crcs, list) or len(crcs) != max(1, -(-nbytes // block)) or any(type(c) is not int for c in crcs):
        return f"section '{name}' lists {len(crcs) if isinstance(crcs, list) else crcs!r} checksums for {nbytes} bytes"
    return None


class Snapshot:
    """An opened snapshot: `.meta` (header dict) and `.arrays` (read-only views into the map)."""

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise AGPError(f"{self.path}: cannot open snapshot ({e.strerror}); give an existing .tqidx file") from None
        with f:
            size = self.path.stat().st_size
            if size < PREFIX.size:
                raise AGPError(f"{self.path}: truncated snapshot ({size} bytes, the fixed prefix needs {PREFIX.size}); rebuild it")
            magic, version, hlen, hcrc = PREFIX.unpack(f.read(PREFIX.size))
            if magic != MAGIC:
                raise AGPError(f"{self.path}: not a .tqidx snapshot (bad magic at offset 0); build one with `agp index build`")
            if version > VERSION:
                raise AGPError(f"{self.path}: snapshot format version {version} is newer than this agp reads ({VERSION}); upgrade agp")
            if version < 1:
                raise AGPError(f"{self.path}: invalid snapshot format version {version} at offset 8; rebuild it")
            if hlen > MAX_HEADER or PREFIX.size + hlen > size:
                raise AGPError(f"{self.path}: truncated or corrupt header (length {hlen} at offset 12, file {size} bytes); rebuild it")
            hb = f.read(hlen)
            if zlib.crc32(hb) != hcrc:
                raise AGPError(f"{self.path}: header checksum mismatch (bytes 20..{20 + hlen}); the file is corrupted, rebuild it")
            try:
                self.meta = json.loads(hb)
            except (ValueError, RecursionError):
                raise AGPError(f"{self.path}: header is not valid JSON at offset 20; rebuild it") from None
            self.start = -(-(PREFIX.size + hlen) // ALIGN) * ALIGN
            problem = header_problem(self.meta)
            if problem:
                raise AGPError(f"{self.path}: snapshot header is inconsistent ({problem}); rebuild it")
            body = max((s["offset"] + s["nbytes"] for s in self.meta["sections"].values()), default=0)
            end = self.start + body
            if size < end:
                raise AGPError(f"{self.path}: truncated snapshot: {size} bytes, the header promises {end}; rebuild or re-copy it")
            written = self.start + -(-body // ALIGN) * ALIGN   # the writer pads the last section to ALIGN
            if size > written:
                raise AGPError(f"{self.path}: {size - written} unexpected bytes after the last section (offset {written}); "
                               "the file was appended to or mis-copied, rebuild or re-copy it")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.arrays = {}
        for name, s in self.meta["sections"].items():
            lo = self.start + s["offset"]
            view = memoryview(self._map)[lo:lo + s["nbytes"]]
            if verify:
                self._verify(name, s, view)
            self.arrays[name] = np.frombuffer(view, dtype=np.dtype(s["dtype"])).reshape(s["shape"])

    def _verify(self, name: str, s: dict, view) -> None:
        block = int(self.meta["block_bytes"])
        got = _crcs(view, block)
        for i, (a, b) in enumerate(zip(got, s["crc32"])):
            if a != b:
                off = self.start + s["offset"] + i * block
                raise AGPError(f"{self.path}: checksum mismatch in section '{name}' block {i} (bytes {off}..{off + block}); "
                               "the file is corrupted, rebuild it")
        if len(got) != len(s["crc32"]):
            raise AGPError(f"{self.path}: section '{name}' has {len(got)} blocks, the header lists {len(s['crc32'])}; rebuild it")

    def close(self) -> None:
        self.arrays = {}
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # views still alive elsewhere; the map closes when they go
                pass
