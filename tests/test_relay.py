"""DelayRelay over loopback: the round trip it adds, byte order, EOF, concurrency, backpressure, shutdown.

Every server here listens on 127.0.0.1 and every loop has a bound (a count or a deadline), so a
broken relay fails a test within seconds instead of hanging it."""
from __future__ import annotations

import os
import select
import socket
import socketserver
import statistics
import threading
import time

import pytest

from agp.errors import AGPError
from agp.serve.relay import DelayRelay

TIMEOUT_S = 5.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _SayByeAndClose(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"bye")


class _Hold(socketserver.BaseRequestHandler):
    """Accept and never read, so everything sent towards it piles up in the path."""
    def handle(self):
        self.server.release.wait(TIMEOUT_S)


class Server:
    """A threaded loopback TCP server for one handler class; a context manager giving (host, port)."""

    def __init__(self, handler):
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.release = threading.Event()
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.server.server_address[:2]

    def __exit__(self, *exc):
        self.server.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT_S)


def connect(address) -> socket.socket:
    sock = socket.create_connection(address, timeout=TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = sock.recv(min(n - got, 1 << 20))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def median_rtt_ms(address, n: int) -> float:
    """Median of `n` one-byte ping-pongs on one connection, after a few warm-up trips."""
    with connect(address) as sock:
        samples = []
        for i in range(n + 3):
            start = time.perf_counter()
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            if i >= 3:
                samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@pytest.mark.parametrize("rtt_ms", [0.0, 5.0, 20.0])
def test_round_trip_gains_rtt(rtt_ms):
    with Server(_Echo) as echo:
        direct = median_rtt_ms(echo, 30)
        with DelayRelay(target=echo, rtt_ms=rtt_ms) as relay:
            relayed = median_rtt_ms(relay.address, 30 if rtt_ms < 10 else 15)
    # Slack: the relay adds two loopback legs and two Python event-loop hops per trip (a few times a
    # direct trip), each timed wake-up overshoots by tens of microseconds, and this 2-core machine
    # runs other jobs, so the relay thread can wait a scheduler tick; the median absorbs the spikes.
    slack = 4 * direct + 2.0
    assert rtt_ms <= relayed < rtt_ms + slack, (direct, relayed)


def test_delay_is_by_timestamp_not_cumulative():
    """Ten pings 2 ms apart, answers read at the end: each is held rtt from its own arrival, so the
    last answer comes ~rtt after the last ping; a sleep per chunk would queue them, 10 ms each way."""
    rtt_ms, count = 20.0, 10
    with Server(_Echo) as echo, DelayRelay(target=echo, rtt_ms=rtt_ms) as relay, connect(relay.address) as sock:
        for _ in range(count):
            sock.sendall(b"p")
            last_sent = time.perf_counter()
            time.sleep(0.002)
        got = recv_exactly(sock, count)
        after_last_ms = (time.perf_counter() - last_sent) * 1e3
    assert got == b"p" * count
    # a per-chunk sleep would put this near 10 * 20 - 18 = 182 ms; slack as in the rtt test
    assert rtt_ms <= after_last_ms < rtt_ms + 25.0, after_last_ms


def test_megabyte_arrives_in_order():
    payload = os.urandom(1 << 20)  # random, not a repeated block, which would hide a swap of two blocks
    with Server(_Echo) as echo, DelayRelay(target=echo, rtt_ms=5.0) as relay, connect(relay.address) as sock:
        # send from a thread: echo sends back while we send, and a single thread would deadlock on full buffers
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        got = recv_exactly(sock, len(payload))
        sender.join(TIMEOUT_S)
    assert got == payload


def test_relay_closes_client_when_target_closes():
    with Server(_SayByeAndClose) as target, DelayRelay(target=target, rtt_ms=5.0) as relay:
        with connect(relay.address) as sock:
            assert recv_exactly(sock, 3) == b"bye"
            assert sock.recv(1) == b""  # EOF, forwarded after the data


def test_unreachable_target_ends_the_client_connection():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]  # bound, never listening: connecting is refused
        with DelayRelay(target=("127.0.0.1", closed_port), rtt_ms=0.0) as relay, connect(relay.address) as sock:
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass  # a reset ends it just as well


def test_concurrent_connections_each_echo_their_own_bytes():
    results: dict[int, bool] = {}

    def one(i, address):
        payload = bytes([i]) * 32768 + os.urandom(1024)
        with connect(address) as sock:
            sock.sendall(payload)
            results[i] = recv_exactly(sock, len(payload)) == payload

    with Server(_Echo) as echo, DelayRelay(target=echo, rtt_ms=5.0) as relay:
        threads = [threading.Thread(target=one, args=(i, relay.address), daemon=True) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
        assert relay.connections == 16
    assert results == {i: True for i in range(16)}


def test_backpressure_bounds_what_the_relay_holds():
    limit = 64 * 1024
    with Server(_Hold) as target, DelayRelay(target=target, rtt_ms=1.0, buffer_bytes=limit) as relay:
        with connect(relay.address) as sock:
            sock.setblocking(False)
            sent, cap, chunk = 0, 64 << 20, b"z" * 65536
            # bounded: stop at `cap`, or once the path has been full for 0.3 s (the relay stopped reading)
            while sent < cap and select.select([], [sock], [], 0.3)[1]:
                try:
                    sent += sock.send(chunk)
                except BlockingIOError:
                    continue
        assert sent < cap, "the relay kept reading although the target never did"
        assert 0 < relay.peak_queued <= limit


def test_close_stops_listening_and_resets_open_connections():
    with Server(_Echo) as echo:
        relay = DelayRelay(target=echo, rtt_ms=0.0).start()
        address = relay.address
        sock = connect(address)
        sock.sendall(b"a")
        assert sock.recv(1) == b"a"
        start = time.monotonic()
        relay.close()
        relay.close()  # idempotent
        assert time.monotonic() - start < 2.0
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
        finally:
            sock.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=TIMEOUT_S).close()


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(AGPError, match="rtt_ms"):
        DelayRelay(target=("127.0.0.1", 1), rtt_ms=-1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(AGPError, match="cannot listen"):
            DelayRelay(target=("127.0.0.1", 1), rtt_ms=0, listen=busy.getsockname()).start()
