"""Loopback mode: sender and receiver in one process over a real socketpair, for same-host debugging."""
from __future__ import annotations

import dataclasses
import socket
import struct

from agp.ptp.errors import LengthMismatch, TruncatedPacket
from agp.ptp.packet import HEADER, MAX_PACKET, decode_packet, encode_packet, section_sizes
from agp.ptp.receiver import Receiver
from agp.ptp.sections import Packet

FRAME = struct.Struct("<I")


def send_frame(sock: socket.socket, data: bytes) -> None:
    """Length-prefixed frame (u32 little-endian length, then the packet)."""
    sock.sendall(FRAME.pack(len(data)) + data)


def recv_frame(sock: socket.socket, max_bytes: int = MAX_PACKET) -> bytes:
    """Read one frame; a claimed length above `max_bytes` is refused before reading, and the buffer
    grows only with bytes actually received (never pre-allocated to the claim)."""
    head = _recv_exact(sock, FRAME.size, FRAME.size)
    (n,) = FRAME.unpack(head)
    if n > max_bytes:
        raise LengthMismatch(f"frame claims {n} bytes, more than the {max_bytes}-byte limit")
    return _recv_exact(sock, n, max_bytes)


def _recv_exact(sock: socket.socket, n: int, limit: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise TruncatedPacket(f"connection closed after {len(buf)} of {n} frame bytes")
        buf += chunk
    return bytes(buf)


def dump(data: bytes) -> dict:
    """A readable summary of a packet for debugging: header fields, section sizes, identity, payload codec."""
    magic, version, flags, mask, total, crc = HEADER.unpack_from(data, 0)
    p = decode_packet(data)
    return {"magic": magic.decode(), "version": version, "flags": flags, "section_mask": f"{mask:05b}",
            "bytes": total, "crc32": f"{crc:08x}", "sizes": section_sizes(data),
            "identity": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in dataclasses.asdict(p.identity).items()},
            "payload": {k: v for k, v in p.payload.meta.items()}}


class LoopbackLink:
    """Sends packets to an in-process loopback Receiver through OS sockets; `send` returns (packet, dump)."""

    def __init__(self, model_fp, tokenizer_fp, quantization: str, host: str = "loopback", timeout_s: float = 5.0,
                 **receiver_kw):
        self.receiver = Receiver(model_fp, tokenizer_fp, quantization, host, loopback=True, **receiver_kw)
        self.host = host
        self._tx, self._rx = socket.socketpair()
        for s in (self._tx, self._rx):
            s.settimeout(timeout_s)  # bounded: a lost frame fails the call instead of hanging it

    def send(self, packet: Packet) -> tuple[Packet, dict]:
        idn = dataclasses.replace(packet.identity, source_host=self.host, target_host=self.host)
        data = encode_packet(dataclasses.replace(packet, identity=idn, loopback=True))
        return self.send_bytes(data)

    def send_bytes(self, data: bytes) -> tuple[Packet, dict]:
        send_frame(self._tx, data)
        got = recv_frame(self._rx)
        return self.receiver.receive(got), dump(got)

    def close(self) -> None:
        self._tx.close()
        self._rx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
