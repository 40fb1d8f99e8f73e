"""`agp serve`: the resume server, the corrective side of a two-host split (docs/serve.md).

The server owns layers [b, L) and the head. A client (the reflex side) runs [0, b) and sends
each new span of boundary states as AGP-PTP packets (agp.serve.protocol): the server extends that
session's KV with them and answers the next token (resume), or the accepted count and correction
of a drafted span (verify, self-speculative decoding across hosts: one round trip per k drafted
tokens), with its own timings.

Shape: asyncio for the sockets, one worker thread for MLX (requests of all connections run one
at a time, in arrival order per connection). Per connection, a bounded queue between the reader
and the worker: a client that pipelines more than `queue` requests stops being read (TCP
backpressure) instead of growing memory. Frames are refused before they are read when their
length is over the limit, and dropped when a started frame does not finish within
`frame_timeout_s` (slow drip). A malformed frame, a bad tag, a packet the Receiver refuses (other
model, tokenizer, codec, checksum) get a typed error response and the connection is closed; other
connections keep being served. Errors a client recovers from on the same connection (an unknown
session to re-send, a span gap, a replay) leave it open.

Security: loopback by default. Binding any other address needs a key (`--key-file`), and then
every frame in both directions carries an HMAC-SHA256 tag.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import struct
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import mlx.core as mx

from agp.config import ConfigMixin
from agp.errors import AGPError
from agp.ptp.errors import PTPError, TruncatedPacket
from agp.ptp.packet import decode_packet
from agp.serve import protocol as P
from agp.serve.sessions import REPLAY, Sessions
from agp.transfer.resume import backbone_quantization, receiver_for

# Errors after which the connection is still in a known state: the client may retry on it.
RECOVERABLE = {"session", "span", "replay", "layer"}
DEFAULT_PORT = 7433


@dataclass
class ServeArgs(ConfigMixin):
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_sessions: int = 64
    idle_s: float = 300.0           # a session (and a connection) unused this long is dropped
    frame_timeout_s: float = 10.0   # a started frame must be complete within this
    max_frame: int = P.MAX_FRAME
    queue: int = 8                  # pipelined requests per connection before its reads pause
    slack: int = 16                 # positions a verify may roll back (most drafts + 1, with margin)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Stats:
    connections: int = 0
    requests: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    replays_answered: int = 0

    def to_dict(self, sessions: Sessions) -> dict:
        return {"connections": self.connections, "requests": dict(self.requests), "errors": dict(self.errors),
                "replays_answered": self.replays_answered, "sessions_held": len(sessions.table),
                "sessions_created": sessions.created, "sessions_evicted": sessions.evicted,
                "sessions_expired": sessions.expired}


class ResumeServer:
    """Layers [layer, L) of `bb` for many sessions over TCP."""

    def __init__(self, bb, layer: int, args: ServeArgs | None = None, key: bytes | None = None):
        self.args = args or ServeArgs()
        if not 0 < layer < bb.n_layers:
            raise AGPError(f"split layer {layer} must lie in 1..{bb.n_layers - 1} for this {bb.n_layers}-layer model")
        if key is None and not is_loopback(self.args.host):
            raise AGPError(f"binding the resume server to {self.args.host} needs a key: pass --key-file FILE "
                           f"(every frame is then authenticated), or bind 127.0.0.1")
        self.bb, self.layer, self.key = bb, int(layer), key
        # MLX streams are per thread: weights still lazily loaded on this thread's stream cannot be
        # evaluated on the server's MLX thread ("no Stream(cpu, 0) in current thread"), so load them now
        mx.eval(bb.model.parameters())
        self.receiver = receiver_for(bb)
        self.sessions = Sessions(bb, self.layer, self.receiver, self.args.max_sessions, self.args.idle_s,
                                 self.args.slack)
        self.stats = Stats()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="agp-serve-mlx")
        self._open: set = set()      # connection tasks

    def info(self) -> dict:
        bb = self.bb
        return {"protocol": 1, "model_fingerprint": bb.fingerprint, "tokenizer_fingerprint": bb.tokenizer_fingerprint,
                "quantization": backbone_quantization(bb), "layers": [self.layer, bb.n_layers],
                "hidden_size": bb.hidden_size, "keyed": self.key is not None, "max_frame": self.args.max_frame}

    # --- one request, on the MLX thread ------------------------------------------------------
    def handle(self, req: P.Request) -> P.Response:
        t0 = time.perf_counter()
        self.stats.requests[P.KINDS[req.kind]] += 1
        if req.kind == P.HELLO:
            return P.Response(P.HELLO, request_id=req.request_id, info=self.info())
        if req.kind == P.PING:
            return P.Response(P.PING, request_id=req.request_id, session=req.session)
        if req.kind == P.CLOSE:
            held = self.sessions.close(req.session)
            return P.Response(P.CLOSE, request_id=req.request_id, session=req.session, accepted=int(held))
        if not req.packets:
            raise P.MalformedFrame(f"a {P.KINDS[req.kind]} request carries at least one packet")
        session = self.sessions.get(req.session, req.packets[0])
        digest = hashlib.sha256(b"".join(bytes(p) for p in req.packets)).digest()
        seq = decode_packet(req.packets[0]).identity.seq
        cached = session.replies.get(seq)
        if cached is not None and cached[0] == digest:
            self.stats.replays_answered += 1
            resp = cached[1]
            resp.request_id = req.request_id
            return resp
        packets = [self.receiver.receive(p) for p in req.packets]
        for p in packets:
            if p.identity.session_id != req.session:
                raise P.MalformedFrame(f"packet of session {p.identity.session_id:#x} in a request for session "
                                       f"{req.session:#x}")
        t1 = time.perf_counter()
        out = session.run(req, packets)
        t2 = time.perf_counter()
        resp = P.Response(req.kind, request_id=req.request_id, session=req.session, token=out.token,
                          accepted=out.accepted, topk=out.topk, state=out.state,
                          timings_us=((t1 - t0) * 1e6, (t2 - t1) * 1e6, 0.0))
        session.replies[seq] = (digest, resp)
        while len(session.replies) > REPLAY:
            session.replies.popitem(last=False)
        return resp

    def answer(self, body: bytes) -> tuple[bytes, bool]:
        """(response frame body, keep the connection open?) for one request frame's body."""
        req = None
        try:
            req = P.Request.decode(P.unsign(self.key, body))
            resp, keep = self.handle(req), True
        except PTPError as e:
            self.stats.errors[e.reason] += 1
            resp, keep = P.error_response(req.kind if req else 0, req.request_id if req else 0,
                                          req.session if req else 0, e), e.reason in RECOVERABLE
        except AGPError as e:       # e.g. a cache that cannot roll back that far
            self.stats.errors["refused"] += 1
            resp, keep = P.error_response(req.kind if req else 0, req.request_id if req else 0,
                                          req.session if req else 0, e), True
        t = time.perf_counter()
        out = resp.encode()
        if not resp.status:         # the encode time goes in the header it describes
            out = bytearray(out)
            struct.pack_into("<f", out, P.RESP.size - 4, (time.perf_counter() - t) * 1e6)
            out = bytes(out)
        return P.sign(self.key, out), keep

    # --- sockets -------------------------------------------------------------------------------
    async def read_frame(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next frame's bytes, None at a clean end of stream."""
        try:
            head = await asyncio.wait_for(reader.readexactly(P.LEN.size), self.args.idle_s)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None
            raise TruncatedPacket(f"connection closed after {len(e.partial)} of 4 frame-length bytes") from None
        except asyncio.TimeoutError:
            raise P.SlowFrame(f"connection idle for {self.args.idle_s:g} s") from None
        (n,) = P.LEN.unpack(head)
        if n > self.args.max_frame:
            raise P.FrameTooLarge(f"frame claims {n} bytes, more than this server's {self.args.max_frame}-byte limit")
        try:
            return await asyncio.wait_for(reader.readexactly(n), self.args.frame_timeout_s)
        except asyncio.IncompleteReadError as e:
            raise TruncatedPacket(f"connection closed after {len(e.partial)} of {n} frame bytes") from None
        except asyncio.TimeoutError:
            raise P.SlowFrame(f"frame of {n} bytes not complete within {self.args.frame_timeout_s:g} s") from None

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self._open.add(asyncio.current_task())
        queue: asyncio.Queue = asyncio.Queue(self.args.queue)
        worker = asyncio.create_task(self.respond(queue, writer))
        try:
            while not worker.done():
                try:
                    frame = await self.read_frame(reader)
                except PTPError as e:
                    await put_unless_done(queue, e, worker)
                    break
                except (ConnectionError, OSError):
                    break
                if frame is None or not await put_unless_done(queue, frame, worker):
                    break
        except asyncio.CancelledError:
            # the server is stopping: end this connection quietly (asyncio's streams log a task that
            # ends cancelled as an error) and drop what was queued, as a killed process would
            worker.cancel()
        finally:
            if not worker.done():
                await put_unless_done(queue, None, worker)
            await asyncio.gather(worker, return_exceptions=True)
            writer.close()
            self._open.discard(asyncio.current_task())

    async def respond(self, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            if isinstance(item, PTPError):       # a frame that could not be read: say why, then close
                self.stats.errors[item.reason] += 1
                out, keep = P.sign(self.key, P.error_response(0, 0, 0, item).encode()), False
            else:
                out, keep = await loop.run_in_executor(self.pool, self.answer, item)
            try:
                writer.write(P.LEN.pack(len(out)) + out)
                await writer.drain()
            except (ConnectionError, OSError):
                keep = False
            if not keep:
                writer.close()
                return

    async def serve(self, ready: threading.Event | None = None, bound: list | None = None) -> None:
        server = await asyncio.start_server(self.connection, self.args.host, self.args.port,
                                            limit=self.args.max_frame + 16)
        if bound is not None:
            bound.append(server.sockets[0].getsockname()[:2])
        if ready is not None:
            ready.set()
        try:
            async with server:
                await server.serve_forever()
        finally:                 # stopping drops every connection, as a killed process would
            for task in list(self._open):
                task.cancel()
            await asyncio.gather(*self._open, return_exceptions=True)


async def put_unless_done(queue: asyncio.Queue, item, worker: asyncio.Task) -> bool:
    """Queue `item` for the worker unless the worker ends first (it closed the connection)."""
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({put, worker}, return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
        return False
    return True


class ServerThread:
    """The server on a background event loop (tests, benchmarks, the stage's own measurements).

        with ServerThread(ResumeServer(bb, 6, ServeArgs(port=0))) as srv:
            client = Client(srv.address)
    """

    def __init__(self, server: ResumeServer):
        self.server, self.address = server, None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="agp-serve", daemon=True)
        self._task = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self.server.serve(self._ready, self._bound))
        try:
            self._loop.run_until_complete(self._task)
        except (asyncio.CancelledError, Exception) as e:   # noqa: BLE001 - kept for start() to report
            self._error = e
        finally:
            self._loop.close()

    def start(self) -> "ServerThread":
        self._ready, self._bound, self._error = threading.Event(), [], None
        self._thread.start()
        if not self._ready.wait(30) or not self._bound:
            raise AGPError(f"the resume server did not start: {self._error}")
        self.address = tuple(self._bound[0])
        return self

    def stop(self) -> None:
        if self._task is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(10)
        self.server.pool.shutdown(wait=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
