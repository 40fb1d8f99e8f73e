"""The `.tqidx` snapshot: a versioned, checksummed, memory-mappable file of packed TurboQuant codes.

Layout (little-endian; spec with rationale in docs/index.md):

    header  64 B   magic "AGPTQIDX", u16 version, u16 flags, u32 dim, u32 padded_dim, u8 bits, u8 rotation,
                   u16 0, u32 seed, u32 blocks, u64 count, u32 levels, u32 params crc32, 12 B zero, u32 header crc32
    params         f32[levels] codebook, f32[dim] mean                (padded to 64 B)
    block * n      32 B block header: "TQBLOCK1", u64 rows, u32 crc(codes), u32 crc(scales), u32 crc(vectors),
                   u32 crc(block header); then codes u8[rows, code_bytes], scales f32[rows],
                   vectors f16[rows, dim] (only with FLAG_VECTORS), each padded to 64 B

Opening maps the file (np.memmap) and returns views into it: no copy of the codes. Appending writes a
new block after the last declared one and then rewrites the 64-byte header; until that header write
lands, readers see the old count and the next append overwrites the tail, so a crash mid-append loses
only the rows being appended.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from agp.errors import AGPError
from agp.io import atomic_path

MAGIC = b"AGPTQIDX"
BLOCK_MAGIC = b"TQBLOCK1"
VERSION = 1
HEADER = struct.Struct("<8sHHIIBBHIIQII12s")  # 60 bytes, then u32 crc
BLOCK = struct.Struct("<8sQIII")  # 28 bytes, then u32 crc
ALIGN = 64
FLAG_VECTORS = 1
ROTATIONS = ("hadamard", "dense")


def _pad(n: int) -> int:
    return (-n) % ALIGN


def _crc(buf) -> int:
    return zlib.crc32(memoryview(buf).cast("B")) & 0xFFFFFFFF


@dataclasses.dataclass
class Meta:
    """Everything the header and params block hold."""

    dim: int
    padded_dim: int
    bits: int
    seed: int
    rotation: str
    codebook: np.ndarray  # f32 [2**bits]
    mean: np.ndarray  # f32 [dim]
    has_vectors: bool
    count: int = 0
    blocks: int = 0

    @property
    def code_bytes(self) -> int:
        return (self.padded_dim * self.bits + 7) // 8


@dataclasses.dataclass
class Block:
    codes: np.ndarray  # u8 [rows, code_bytes]
    scales: np.ndarray  # f32 [rows]
    vectors: np.ndarray | None  # f16 [rows, dim]


def _header_bytes(m: Meta) -> bytes:
    params = _params_bytes(m)
    body = HEADER.pack(MAGIC, VERSION, FLAG_VECTORS if m.has_vectors else 0, m.dim, m.padded_dim, m.bits,
                       ROTATIONS.index(m.rotation), 0, m.seed, m.blocks, m.count, 1 << m.bits,
                       _crc(params), b"\0" * 12)
    return body + struct.pack("<I", _crc(body))


def _params_bytes(m: Meta) -> bytes:
    raw = np.ascontiguousarray(m.codebook, "<f4").tobytes() + np.ascontiguousarray(m.mean, "<f4").tobytes()
    return raw + b"\0" * _pad(len(raw))


def _block_bytes(m: Meta, b: Block):
    rows = len(b.scales)
    parts = [np.ascontiguousarray(b.codes, np.uint8), np.ascontiguousarray(b.scales, "<f4")]
    if m.has_vectors:
        parts.append(np.ascontiguousarray(b.vectors, "<f2"))
    crcs = [_crc(p) for p in parts] + [0] * (3 - len(parts))
    head = BLOCK.pack(BLOCK_MAGIC, rows, *crcs)
    yield head + struct.pack("<I", _crc(head))
    for p in parts:
        yield p.tobytes()
        yield b"\0" * _pad(p.nbytes)


def write(path, meta: Meta, blocks: list[Block]) -> None:
    """Write a complete snapshot atomically (temp file + rename)."""
    meta = dataclasses.replace(meta, blocks=len(blocks), count=sum(len(b.scales) for b in blocks))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(_header_bytes(meta))
            f.write(_params_bytes(meta))
            for b in blocks:
                for chunk in _block_bytes(meta, b):
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())


def _parse_header(path: Path, buf: bytes) -> Meta:
    if len(buf) < HEADER.size + 4:
        raise AGPError(f"{path}: truncated snapshot ({len(buf)} bytes, header needs 64); rebuild it with `agp index build`")
    (magic, version, flags, dim, pdim, bits, rot, _, seed, nblocks, count, levels, pcrc,
     _z) = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise AGPError(f"{path}: not an AGP index snapshot (bad magic at offset 0); expected a .tqidx file")
    if version > VERSION:
        raise AGPError(f"{path}: snapshot format v{version} is newer than this agp reads (v{VERSION}); upgrade agp")
    (hcrc,) = struct.unpack_from("<I", buf, HEADER.size)
    if _crc(buf[:HEADER.size]) != hcrc:
        raise AGPError(f"{path}: header checksum mismatch at offset 0 (corrupted snapshot); rebuild it")
    if version < 1 or not 1 <= bits <= 8 or levels != 1 << bits or rot >= len(ROTATIONS) or not 0 < dim <= pdim:
        raise AGPError(f"{path}: header holds impossible values (version {version}, bits {bits}, dim {dim}/{pdim})")
    return Meta(dim=dim, padded_dim=pdim, bits=bits, seed=seed, rotation=ROTATIONS[rot],
                codebook=np.zeros(levels, np.float32), mean=np.zeros(dim, np.float32),
                has_vectors=bool(flags & FLAG_VECTORS), count=count, blocks=nblocks), pcrc


def open_snapshot(path, verify: bool = True) -> tuple[Meta, list[Block], int]:
    """Map a snapshot; returns (meta, blocks as views into the map, end offset of the last block).

    With `verify` every block's CRC-32 is checked (reads the file once, copies nothing)."""
    path = Path(path)
    if not path.exists():
        raise AGPError(f"{path}: no such snapshot; build one with `agp index build`")
    size = path.stat().st_size
    if size == 0:
        raise AGPError(f"{path}: empty file, not a snapshot; build one with `agp index build`")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    meta, pcrc = _parse_header(path, bytes(mm[:HEADER.size + 4]))
    off = HEADER.size + 4
    plen = 4 * ((1 << meta.bits) + meta.dim)
    if off + plen > size:
        raise AGPError(f"{path}: truncated at offset {size} inside the params block (needs {off + plen}); rebuild it")
    if _crc(mm[off:off + plen + _pad(plen)]) != pcrc:
        raise AGPError(f"{path}: params checksum mismatch at offset {off} (corrupted snapshot); rebuild it")
    meta.codebook = np.frombuffer(mm, "<f4", 1 << meta.bits, off).copy()
    meta.mean = np.frombuffer(mm, "<f4", meta.dim, off + 4 * (1 << meta.bits)).copy()
    off += plen + _pad(plen)
    blocks, total = [], 0
    for bi in range(meta.blocks):
        if off + BLOCK.size + 4 > size:
            raise AGPError(f"{path}: truncated at offset {size}: block {bi} header missing (needs {off + 32}); rebuild it")
        head = bytes(mm[off:off + BLOCK.size])
        magic, rows, *crcs = BLOCK.unpack(head)
        (hcrc,) = struct.unpack_from("<I", bytes(mm[off + BLOCK.size:off + BLOCK.size + 4]))
        if magic != BLOCK_MAGIC or _crc(head) != hcrc:
            raise AGPError(f"{path}: block {bi} header corrupted at offset {off}; rebuild the snapshot")
        off += BLOCK.size + 4
        shapes = [("codes", np.uint8, (rows, meta.code_bytes)), ("scales", "<f4", (rows,))]
        if meta.has_vectors:
            shapes.append(("vectors", "<f2", (rows, meta.dim)))
        arrs = []
        for (name, dt, shape), crc in zip(shapes, crcs):
            n = int(np.prod(shape)) * np.dtype(dt).itemsize
            if off + n > size:
                raise AGPError(f"{path}: truncated at offset {size}: block {bi} {name} needs bytes up to {off + n}; "
                               f"rebuild the snapshot")
            if verify and _crc(mm[off:off + n]) != crc:
                raise AGPError(f"{path}: block {bi} {name} checksum mismatch (offset {off}..{off + n}); "
                               f"the snapshot is corrupted, rebuild it")
            arrs.append(np.frombuffer(mm, dt, int(np.prod(shape)), off).reshape(shape))
            off += n + _pad(n)
        blocks.append(Block(arrs[0], arrs[1], arrs[2] if meta.has_vectors else None))
        total += rows
    if total != meta.count:
        raise AGPError(f"{path}: header says {meta.count} vectors but blocks hold {total}; rebuild the snapshot")
    return meta, blocks, off


def append(path, block: Block) -> Meta:
    """Append one block of rows to an existing snapshot (see the module docstring for crash behaviour)."""
    path = Path(path)
    meta, _, end = open_snapshot(path, verify=False)
    meta.blocks += 1
    meta.count += len(block.scales)
    with open(path, "r+b") as f:
        f.truncate(end)  # drop any tail left by an interrupted append
        f.seek(end)
        for chunk in _block_bytes(meta, block):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        f.write(_header_bytes(meta))
        f.flush()
        os.fsync(f.fileno())
    return meta
