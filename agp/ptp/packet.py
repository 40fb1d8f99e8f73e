"""AGP-PTP v1 framing: header, section table, CRC-32 per section and over the whole packet (docs/ptp.md §1)."""
from __future__ import annotations

import struct
import zlib

from agp.ptp.errors import (BadMagic, ChecksumMismatch, LengthMismatch, MalformedHeader, MalformedSection,
                            PTPError, TruncatedPacket, UnsupportedVersion)
from agp.ptp.sections import SECTION_NAMES, Identity, Packet, Payload, Semantic, Trajectory, Vitality
from agp.quant.codec import CodecError, read_varint, write_varint

MAGIC = b"AGPP"
VERSION = 1
HEADER = struct.Struct("<4sBBBII")  # magic, version, flags, section mask, total length, packet crc
HEADER_SIZE = HEADER.size  # 15
CRC_OFFSET = 11
F_LOOPBACK = 0x01
REQUIRED_MASK = 0b10001  # identity and payload
MAX_PACKET = 1 << 28  # section lengths are varints of at most 4 bytes
_UNPACK = (Identity.unpack, Trajectory.unpack, Vitality.unpack, Semantic.unpack, Payload.unpack)


def encode_packet(packet: Packet) -> bytes:
    """Serialize a Packet: sections, table with per-section CRC-32, header with the whole-packet CRC-32."""
    bodies = [(i, s.pack()) for i, s in enumerate(packet.sections()) if s is not None]
    mask = sum(1 << i for i, _ in bodies)
    if mask & REQUIRED_MASK != REQUIRED_MASK:
        raise PTPError("a packet needs an identity and a payload section")
    table = b"".join(write_varint(len(b)) + struct.pack("<I", zlib.crc32(b)) for _, b in bodies)
    total = HEADER_SIZE + len(table) + sum(len(b) for _, b in bodies)
    if total > MAX_PACKET:
        raise PTPError(f"packet of {total} bytes exceeds the {MAX_PACKET}-byte limit: split the span")
    out = bytearray(HEADER.pack(MAGIC, VERSION, F_LOOPBACK if packet.loopback else 0, mask, total, 0))
    out += table
    for _, b in bodies:
        out += b
    struct.pack_into("<I", out, CRC_OFFSET, zlib.crc32(out))
    return bytes(out)


def _packet_crc(view: memoryview) -> int:
    crc = zlib.crc32(view[:CRC_OFFSET])
    crc = zlib.crc32(b"\0\0\0\0", crc)
    return zlib.crc32(view[HEADER_SIZE:], crc)


def split_packet(data) -> tuple[int, int, list[tuple[int, memoryview]]]:
    """Steps 1-4 of docs/ptp.md §3: framing and checksums. Returns (flags, mask, [(section id, view)])."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    n = len(view)
    if n < HEADER_SIZE:
        raise TruncatedPacket(f"{n} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, flags, mask, total, crc = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise BadMagic(f"magic {bytes(magic)!r} at offset 0 is not {MAGIC!r}: not an AGP-PTP packet")
    if version != VERSION:
        raise UnsupportedVersion(f"packet version {version} at offset 4; this receiver speaks version {VERSION}")
    if flags & ~F_LOOPBACK:
        raise MalformedHeader(f"reserved flag bits set (0x{flags:02x}) at offset 5")
    if mask & REQUIRED_MASK != REQUIRED_MASK or mask >> len(SECTION_NAMES):
        raise MalformedHeader(f"section mask 0x{mask:02x} at offset 6 must include identity and payload and only bits 0-4")
    if total != n:
        # compared before anything else is read: a claimed length costs nothing
        raise (TruncatedPacket if total > n else LengthMismatch)(
            f"header claims {total} bytes at offset 7, {n} were received")
    ids = [i for i in range(len(SECTION_NAMES)) if mask >> i & 1]
    off, entries = HEADER_SIZE, []
    for i in ids:
        try:
            ln, off = read_varint(view, off, f"{SECTION_NAMES[i]} section length", max_bytes=4)
        except CodecError as e:
            raise MalformedHeader(str(e)) from None
        if off + 4 > n:
            raise TruncatedPacket(f"section table ends inside the {SECTION_NAMES[i]} checksum at offset {off}")
        (scrc,) = struct.unpack_from("<I", view, off)
        off += 4
        entries.append((i, ln, scrc))
    if off + sum(ln for _, ln, _ in entries) != n:
        raise LengthMismatch(f"section lengths add up to {off + sum(ln for _, ln, _ in entries)} bytes, "
                             f"the packet has {n}")
    sections = []
    for i, ln, scrc in entries:
        body = view[off: off + ln]
        if zlib.crc32(body) != scrc:
            raise ChecksumMismatch(f"{SECTION_NAMES[i]} section (offset {off}, {ln} bytes) fails its CRC-32",
                                   SECTION_NAMES[i])
        sections.append((i, body))
        off += ln
    if _packet_crc(view) != crc:
        raise ChecksumMismatch("whole-packet CRC-32 at offset 11 does not match (header or section table damaged)",
                               "packet")
    return flags, mask, sections


def decode_packet(data) -> Packet:
    """Bytes -> Packet (framing, checksums, every field range-checked); views into `data`, no copies."""
    flags, _, sections = split_packet(data)
    parts: dict[int, object] = {}
    for i, body in sections:
        try:
            parts[i] = _UNPACK[i](body)
        except PTPError:
            raise
        except (ValueError, IndexError, struct.error, CodecError) as e:  # belt and braces: still typed
            raise MalformedSection(f"{SECTION_NAMES[i]} section: {e}", SECTION_NAMES[i]) from None
    return Packet(identity=parts[0], payload=parts[4], trajectory=parts.get(1), vitality=parts.get(2),
                  semantic=parts.get(3), loopback=bool(flags & F_LOOPBACK))


def section_sizes(data) -> dict[str, int]:
    """Bytes per part of a valid packet: header, table and each section (for size reports)."""
    _, _, sections = split_packet(data)
    body = sum(len(b) for _, b in sections)
    out = {"header": HEADER_SIZE, "table": len(data) - HEADER_SIZE - body}
    out.update({SECTION_NAMES[i]: len(b) for i, b in sections})
    return out
