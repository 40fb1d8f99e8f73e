"""The resume server's wire: length-prefixed frames around AGP-PTP packets (docs/serve.md).

Frame, both directions (little-endian):
    u32  length            bytes after this field (body + tag); above the limit -> refused unread
    body                   a request or a response (below)
    tag  32 bytes          HMAC-SHA256(key, body) when the server runs with a key, else absent

Request body:
    u8   kind              HELLO 1 | RESUME 2 | VERIFY 3 | CLOSE 4 | PING 5
    u8   flags             WANT_TOKEN 1 (greedy token after the last position) | WANT_STATE 2 (the
                           final state of the emitted position, f32) | WANT_TOPK 4
    u16  topk              top-k logits to return with WANT_TOPK (at most MAX_TOPK)
    u32  request id        echoed in the response (pipelined requests are answered in order)
    u64  session id        the session whose KV the spans extend
    u16  n_drafts          VERIFY: the drafted tokens d1..d_k (the span holds t0, d1..d_k)
    u16  n_packets
    n_drafts x u32         draft token ids
    n_packets x (u32 length, AGP-PTP packet)   consecutive spans of boundary states

Response body:
    u8   kind              the request's kind
    u8   status            0 ok, else an error (ERRORS); the body then ends with reason \\0 message
    u16  n_topk
    u32  request id
    u64  session id
    i32  token             WANT_TOKEN / VERIFY: the next full-depth token, else -1
    u32  accepted          VERIFY: the accepted drafts; RESUME: positions held after the request
    3 x f32                server time in microseconds: decode (packets), infer (layers + head), encode
    n_topk x (u32 id, f32 logit)
    u32  state bytes, then that many bytes of f32 state (WANT_STATE)

Lengths are checked before anything is read from a body; a short or inconsistent body raises
`MalformedFrame`, a bad tag `BadTag`. The HELLO response's payload (after the fixed part) is the
server's description as UTF-8 JSON.
"""
from __future__ import annotations

import hmac
import hashlib
import json
import struct
from dataclasses import dataclass, field

import numpy as np

from agp.ptp.errors import PTPError

HELLO, RESUME, VERIFY, CLOSE, PING = 1, 2, 3, 4, 5
KINDS = {HELLO: "hello", RESUME: "resume", VERIFY: "verify", CLOSE: "close", PING: "ping"}
WANT_TOKEN, WANT_STATE, WANT_TOPK = 1, 2, 4
MAX_TOPK = 1024
MAX_FRAME = 64 << 20          # a 2048-position f32 span of a 4096-wide model is 32 MiB
TAG = 32
LEN = struct.Struct("<I")
REQ = struct.Struct("<BBHIQHH")      # 20 bytes
RESP = struct.Struct("<BBHIQiIfff")  # 32 bytes
U32 = struct.Struct("<I")
TOPK_ITEM = np.dtype([("id", "<u4"), ("logit", "<f4")])


class MalformedFrame(PTPError):
    reason = "frame"


class BadTag(PTPError):
    reason = "auth"


class FrameTooLarge(PTPError):
    reason = "oversize"


class SlowFrame(PTPError):
    reason = "timeout"


class ServerBusy(PTPError):
    reason = "busy"


class UnknownSession(PTPError):
    reason = "session"


class RemoteError(PTPError):
    """An error the server answered with; `.reason` is the server's code."""

    def __init__(self, reason: str, message: str):
        from agp.errors import AGPError
        self.reason, self.section = reason, None
        AGPError.__init__(self, f"the resume server refused the request ({reason}): {message}")


def sign(key: bytes | None, body: bytes) -> bytes:
    return body if key is None else body + hmac.new(key, body, hashlib.sha256).digest()


def unsign(key: bytes | None, frame: bytes) -> bytes:
    """The body of a received frame, its tag checked in constant time when keyed."""
    if key is None:
        return frame
    if len(frame) < TAG:
        raise BadTag(f"frame of {len(frame)} bytes is shorter than its {TAG}-byte tag")
    body, tag = frame[:-TAG], frame[-TAG:]
    if not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
        raise BadTag("frame's HMAC-SHA256 tag does not match: wrong key or a modified frame")
    return body


@dataclass
class Request:
    kind: int
    session: int = 0
    request_id: int = 0
    flags: int = 0
    topk: int = 0
    drafts: list = field(default_factory=list)
    packets: list = field(default_factory=list)   # bytes (encoded AGP-PTP packets)

    def encode(self) -> bytes:
        head = REQ.pack(self.kind, self.flags, self.topk, self.request_id, self.session, len(self.drafts),
                        len(self.packets))
        parts = [head, np.asarray(self.drafts, "<u4").tobytes()]
        for p in self.packets:
            parts += [U32.pack(len(p)), bytes(p)]
        return b"".join(parts)

    @classmethod
    def decode(cls, body) -> "Request":
        view = memoryview(body)
        if len(view) < REQ.size:
            raise MalformedFrame(f"request of {len(view)} bytes is shorter than its {REQ.size}-byte header")
        kind, flags, topk, rid, session, n_drafts, n_packets = REQ.unpack_from(view, 0)
        if kind not in KINDS:
            raise MalformedFrame(f"unknown request kind {kind} at offset 0")
        if topk > MAX_TOPK:
            raise MalformedFrame(f"top-k {topk} is above the limit of {MAX_TOPK}")
        off = REQ.size + 4 * n_drafts
        if off > len(view):
            raise MalformedFrame(f"{n_drafts} drafts need {4 * n_drafts} bytes, the request has {len(view) - REQ.size}")
        drafts = np.frombuffer(view[REQ.size:off], "<u4").tolist()
        packets = []
        for i in range(n_packets):
            if off + 4 > len(view):
                raise MalformedFrame(f"packet {i} of {n_packets}: its length field passes the end of the request")
            (n,) = U32.unpack_from(view, off)
            if off + 4 + n > len(view):
                raise MalformedFrame(f"packet {i} claims {n} bytes, {len(view) - off - 4} remain")
            packets.append(view[off + 4: off + 4 + n])
            off += 4 + n
        if off != len(view):
            raise MalformedFrame(f"{len(view) - off} bytes after the last packet")
        return cls(kind, session, rid, flags, topk, drafts, packets)


@dataclass
class Response:
    kind: int
    status: int = 0
    request_id: int = 0
    session: int = 0
    token: int = -1
    accepted: int = 0
    timings_us: tuple = (0.0, 0.0, 0.0)     # decode, infer, encode
    topk: np.ndarray | None = None           # TOPK_ITEM records
    state: np.ndarray | None = None          # f32 [H]
    info: dict | None = None                 # HELLO
    error: tuple | None = None               # (reason, message)

    def encode(self) -> bytes:
        topk = np.zeros(0, TOPK_ITEM) if self.topk is None else np.asarray(self.topk, TOPK_ITEM)
        head = RESP.pack(self.kind, self.status, len(topk), self.request_id, self.session, self.token, self.accepted,
                         *self.timings_us)
        if self.status:
            reason, message = self.error
            return head + reason.encode() + b"\0" + message.encode("utf-8", "replace")
        state = b"" if self.state is None else np.asarray(self.state, "<f4").tobytes()
        tail = json.dumps(self.info).encode() if self.info is not None else b""
        return b"".join([head, topk.tobytes(), U32.pack(len(state)), state, tail])

    @classmethod
    def decode(cls, body) -> "Response":
        view = memoryview(body)
        if len(view) < RESP.size:
            raise MalformedFrame(f"response of {len(view)} bytes is shorter than its {RESP.size}-byte header")
        kind, status, n_topk, rid, session, token, accepted, *t = RESP.unpack_from(view, 0)
        r = cls(kind, status, rid, session, token, accepted, tuple(t))
        off = RESP.size
        if status:
            reason, _, message = bytes(view[off:]).partition(b"\0")
            r.error = (reason.decode("ascii", "replace"), message.decode("utf-8", "replace"))
            return r
        end = off + n_topk * TOPK_ITEM.itemsize
        if end + 4 > len(view):
            raise MalformedFrame(f"response claims {n_topk} top-k entries, its body is {len(view)} bytes")
        r.topk = np.frombuffer(view[off:end], TOPK_ITEM) if n_topk else None
        (ns,) = U32.unpack_from(view, end)
        if ns % 4 or end + 4 + ns > len(view):
            raise MalformedFrame(f"response claims a {ns}-byte state, {len(view) - end - 4} bytes remain")
        r.state = np.frombuffer(view[end + 4: end + 4 + ns], "<f4") if ns else None
        rest = bytes(view[end + 4 + ns:])
        r.info = json.loads(rest) if rest else None
        return r

    def raise_for_error(self) -> "Response":
        if self.status:
            raise RemoteError(*self.error)
        return self


def error_response(req_kind: int, rid: int, session: int, err: Exception) -> Response:
    reason = getattr(err, "reason", "internal")
    return Response(req_kind, status=1, request_id=rid, session=session, error=(reason, str(err)))
