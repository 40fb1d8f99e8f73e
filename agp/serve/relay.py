"""A userspace TCP relay that adds a fixed round trip, for benchmarks of the two-host resume server.

`tc netem` is not available on the machines that run AGP's tests, so link latency (0.1 ms
Thunderbolt, 0.3 ms Ethernet, 5 ms Wi-Fi) is emulated here: `DelayRelay` listens on an address,
forwards each accepted connection to a target, and holds every chunk for rtt/2 in each direction,
so one request/response round trip through it gains `rtt_ms`.

The delay is by timestamp: a chunk read at time t is written at t + rtt/2, whatever came before
it, so a burst of chunks gains one delay, not one per chunk (a sleep per chunk would add up and
turn latency into a bandwidth cap). Byte order holds because each direction is one FIFO with
release times that never decrease. Each direction queues at most `buffer_bytes`; past that the
relay stops reading, so TCP flow control pushes back on the sender as a real link's buffer would.

An end of stream is delayed like data and forwarded as a half-close (the peer reads EOF; it can
still send), which is what a real path does when one end calls `close()` or `shutdown(SHUT_WR)`.
The connection is torn down once both directions have ended, or at once on a reset.

The event loop runs in a background thread so that synchronous tests and benchmarks can use the
relay as a context manager. It uses `select()` rather than `epoll`: epoll's timeout has
millisecond granularity, which would round a 0.05 ms half-trip up to 1 ms; select's is in
microseconds. select() cannot watch descriptors at or above FD_SETSIZE (1024), so connections
whose sockets land there are refused rather than crashing the loop.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import math
import selectors
import socket
import threading

from agp.errors import AGPError

READ_BYTES = 64 * 1024          # one read; also the largest chunk that is delayed as one unit
DEFAULT_BUFFER_BYTES = 1 << 20  # per direction: 1 MiB / 2.5 ms half-trip at Wi-Fi rtt is still ~400 MB/s
CONNECT_TIMEOUT_S = 5.0
START_STOP_TIMEOUT_S = 5.0
FD_SETSIZE = 1024               # select()'s limit on descriptor numbers (glibc)
PR_SET_TIMERSLACK = 29
MAX_EARLY_S = 0.5e-3            # the most a wake-up is brought forward (and so the longest spin per chunk)


class _DelayLine:
    """One direction's FIFO of (release time, chunk), bounded by the bytes it holds.

    A chunk counts against the bound from the moment it is read until its write has drained, so
    the bound covers everything the relay holds for that direction."""

    def __init__(self, limit: int, relay: "DelayRelay"):
        self._items: collections.deque[tuple[float, bytes]] = collections.deque()
        self._queued = 0
        self._limit = limit
        self._relay = relay
        self._changed = asyncio.Condition()

    async def space(self) -> int:
        """Wait until the line is below its bound; return how many bytes may be read now."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._queued < self._limit)
            return min(READ_BYTES, self._limit - self._queued)

    async def put(self, release: float, chunk: bytes) -> None:
        async with self._changed:
            self._items.append((release, chunk))
            self._queued += len(chunk)
            self._relay.peak_queued = max(self._relay.peak_queued, self._queued)
            self._changed.notify_all()

    async def get(self) -> tuple[float, bytes]:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._items))
            return self._items.popleft()

    async def done(self, nbytes: int) -> None:
        async with self._changed:
            self._queued -= nbytes
            self._changed.notify_all()


async def _fill(reader: asyncio.StreamReader, line: _DelayLine, delay_s: float) -> None:
    """Read from one side, stamping each chunk with its release time; an empty chunk is EOF."""
    loop = asyncio.get_running_loop()
    while True:
        chunk = await reader.read(await line.space())
        await line.put(loop.time() + delay_s, chunk)
        if not chunk:
            return


class _Clock:
    """Wait until a deadline without overshooting it by the timer's wake-up latency.

    A timed wake-up here lands late by 30 us (a 50 us sleep) to 150 us (a 10 ms one), measured on
    this VM even with 1 ns timer slack; uncorrected that adds ~0.3 ms to a 5 ms round trip. So each
    sleep is brought forward by a running estimate of that lateness, and the remainder is spent
    yielding to the loop (other connections keep being served) until the deadline has passed, so a
    chunk is never released early. One clock per relay: all its sleeps share the one loop thread."""

    def __init__(self):
        self.early_s = 0.0

    async def until(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        wait = deadline - loop.time() - self.early_s
        if wait > 0:
            wake = loop.time() + wait
            await asyncio.sleep(wait)
            late = max(loop.time() - wake, 0.0)
            self.early_s = min(MAX_EARLY_S, 0.8 * self.early_s + 0.2 * late)
        while loop.time() < deadline:
            await asyncio.sleep(0)


async def _release(line: _DelayLine, writer: asyncio.StreamWriter, clock: _Clock) -> None:
    """Write each chunk to the other side at its release time, then forward EOF as a half-close."""
    while True:
        release, chunk = await line.get()
        await clock.until(release)
        if not chunk:
            if writer.can_write_eof():
                writer.write_eof()
            return
        writer.write(chunk)
        await writer.drain()
        await line.done(len(chunk))


def _nodelay(writer: asyncio.StreamWriter) -> None:
    """Nagle would hold small writes back for an ACK and add up to a round trip of its own."""
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _selectable(*writers: asyncio.StreamWriter) -> bool:
    return all(w.get_extra_info("socket").fileno() < FD_SETSIZE for w in writers)


def _fine_timer_slack() -> None:
    """Ask Linux for 1 ns timer slack on this thread: the default 50 us would stretch every
    sub-millisecond wait (measured: a 50 us sleep took ~130 us, ~80 us with the slack at 1 ns)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: keep the platform's default slack


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The relay thread: own the loop until `close()` stops it, then release its selector."""
    _fine_timer_slack()
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class DelayRelay:
    """Listen on `listen` and relay each connection to `target`, adding `rtt_ms` to every round trip.

    Use as a context manager (or `start()` / `close()`); `.address` is the bound (host, port).
    `connections` counts accepted connections; `peak_queued` is the most bytes one direction has
    held, which stays at or below `buffer_bytes`."""

    def __init__(self, target: tuple[str, int], rtt_ms: float, listen: tuple[str, int] = ("127.0.0.1", 0),
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES):
        if not (isinstance(rtt_ms, (int, float)) and math.isfinite(rtt_ms) and rtt_ms >= 0):
            raise AGPError(f"relay rtt_ms must be a finite number >= 0, got {rtt_ms!r}: pass e.g. 0.1, 0.3 or 5.0")
        if buffer_bytes < 1:
            raise AGPError(f"relay buffer_bytes must be >= 1, got {buffer_bytes}: pass e.g. {DEFAULT_BUFFER_BYTES}")
        self.target = (target[0], int(target[1]))
        self.rtt_ms = float(rtt_ms)
        self.listen = (listen[0], int(listen[1]))
        self.buffer_bytes = int(buffer_bytes)
        self.connections = 0
        self.peak_queued = 0
        self._address: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task] = set()
        self._clock = _Clock()

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise AGPError("relay has no address before start(): use `with DelayRelay(...) as relay:`")
        return self._address

    def __enter__(self) -> "DelayRelay":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "DelayRelay":
        """Start the loop thread and bind; raise AGPError when the listen address cannot be bound."""
        if self._thread is not None:
            raise AGPError("relay already started: make a new DelayRelay for a second listener")
        self._loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,), name="agp-delay-relay", daemon=True)
        self._thread.start()
        try:
            self._address = asyncio.run_coroutine_threadsafe(self._bind(), self._loop).result(START_STOP_TIMEOUT_S)
        except OSError as err:
            self.close()
            host, port = self.listen
            raise AGPError(f"relay cannot listen on {host}:{port} ({err.strerror or err}): "
                           "pick a free port, or port 0 for any") from None
        return self

    def close(self) -> None:
        """Stop accepting, reset open connections, stop the loop and join its thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        if thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(START_STOP_TIMEOUT_S)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(START_STOP_TIMEOUT_S)

    async def _bind(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        sock = self._server.sockets[0]
        if sock.fileno() >= FD_SETSIZE:
            raise OSError(f"socket descriptor {sock.fileno()} is beyond select()'s {FD_SETSIZE}; "
                          "run the relay in a process with fewer open files")
        return sock.getsockname()[:2]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """One relayed connection: connect to the target, then run the four pumps until all end."""
        self._handlers.add(asyncio.current_task())
        self.connections += 1
        target_w, clean = None, False
        try:
            target_r, target_w = await asyncio.wait_for(asyncio.open_connection(*self.target), CONNECT_TIMEOUT_S)
            if _selectable(client_w, target_w):
                await self._pump(client_r, client_w, target_r, target_w)
                clean = True
        except (OSError, asyncio.TimeoutError):
            pass  # target unreachable or a side reset: the client sees its connection end, as on a real path
        except asyncio.CancelledError:
            pass  # only close() cancels a handler; ending quietly keeps asyncio from logging each one
        finally:
            self._handlers.discard(asyncio.current_task())
            for writer in (client_w, target_w):
                # after both EOFs a graceful close; after a reset or a shutdown a reset, so nothing lingers
                if writer is not None and clean:
                    writer.close()
                elif writer is not None:
                    writer.transport.abort()

    async def _pump(self, client_r, client_w, target_r, target_w) -> None:
        """Both directions at once; the first failure (a reset) ends the rest."""
        for writer in (client_w, target_w):
            _nodelay(writer)
        delay_s = self.rtt_ms / 2000.0
        up, down = _DelayLine(self.buffer_bytes, self), _DelayLine(self.buffer_bytes, self)
        tasks = [asyncio.create_task(coro) for coro in (
            _fill(client_r, up, delay_s), _release(up, target_w, self._clock),
            _fill(target_r, down, delay_s), _release(down, client_w, self._clock))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # re-raise the reset, if that is what ended it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
