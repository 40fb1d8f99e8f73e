"""The resume server's client: blocking sockets with timeouts, pipelining by `send` then `receive`."""
from __future__ import annotations

import socket
from collections import deque

from agp.errors import AGPError
from agp.ptp.errors import LengthMismatch, TruncatedPacket
from agp.serve import protocol as P


class Unreachable(AGPError, ConnectionError):
    """No server answers at the address (a one-line error, and an OSError for the retry loop)."""


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AGPError(f"--remote {text!r} must be HOST:PORT, e.g. 127.0.0.1:{7433}")
    return host.strip("[]"), int(port)


class Client:
    """One connection to a resume server. `call` is send + receive; pipelining sends several
    requests before receiving their responses, which come back in order."""

    def __init__(self, address: tuple[str, int], key: bytes | None = None, timeout_s: float = 30.0,
                 max_frame: int = P.MAX_FRAME):
        self.address, self.key, self.timeout_s, self.max_frame = tuple(address), key, timeout_s, max_frame
        self.sock = None
        self._next_id = 0
        self._pending: deque[int] = deque()
        self.bytes_sent = self.bytes_received = 0

    def connect(self) -> "Client":
        self.close()
        try:
            self.sock = socket.create_connection(self.address, timeout=self.timeout_s)
        except OSError as e:
            raise Unreachable(f"cannot reach the resume server at {self.address[0]}:{self.address[1]} ({e}); "
                                  f"start it with `agp serve`") from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pending.clear()
        return self

    def send(self, req: P.Request) -> int:
        if self.sock is None:
            self.connect()
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        req.request_id = self._next_id
        body = P.sign(self.key, req.encode())
        self.sock.sendall(P.LEN.pack(len(body)) + body)
        self.bytes_sent += P.LEN.size + len(body)
        self._pending.append(req.request_id)
        return req.request_id

    def receive(self) -> P.Response:
        head = self._exact(P.LEN.size)
        (n,) = P.LEN.unpack(head)
        if n > self.max_frame:
            raise LengthMismatch(f"response frame claims {n} bytes, more than the {self.max_frame}-byte limit")
        resp = P.Response.decode(P.unsign(self.key, self._exact(n)))
        self.bytes_received += P.LEN.size + n
        want = self._pending.popleft() if self._pending else None
        if resp.request_id not in (want, 0):
            raise P.MalformedFrame(f"response to request {resp.request_id} while waiting for {want}")
        return resp

    def call(self, req: P.Request) -> P.Response:
        self.send(req)
        return self.receive()

    def hello(self) -> dict:
        return self.call(P.Request(P.HELLO)).raise_for_error().info

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise TruncatedPacket(f"the server closed the connection after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()
