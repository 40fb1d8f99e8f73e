"""NetnsPair: two namespaces over a veth, processes inside each side, cleanup, and the relay inside one.

The test process itself stays in the host's namespace; what runs inside a side is a short Python
script started with `pair.popen`. Each script prints one line when ready (a port, or a result),
which the test reads under a deadline; every process is stopped in a `finally`."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from agp.errors import AGPError
from agp.serve import netns
from agp.serve.netns import NetnsPair

ROOT = Path(__file__).resolve().parents[1]
READY_S = 10.0  # a fresh interpreter under `ip netns exec` on a loaded 2-core machine

OK, WHY = netns.available()
needs_netns = pytest.mark.skipif(not OK, reason=WHY)

# Echo every connection, one at a time, on (host, 0); print the bound port, then serve until killed.
ECHO = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
"""

# Connect, check `n` ping-pongs and one 256 KiB echo, print {"ok": ..., "median_ms": ...}.
CLIENT = """
import json, os, socket, statistics, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.create_connection((host, port), timeout=5)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
trips = []
for _ in range(n):
    t = time.perf_counter(); sock.sendall(b"x"); ok = sock.recv(1) == b"x"
    trips.append((time.perf_counter() - t) * 1e3)
blob = os.urandom(256 * 1024); sock.sendall(blob); got = b""
while len(got) < len(blob) and (part := sock.recv(65536)):
    got += part
print(json.dumps({"ok": ok and got == blob, "median_ms": statistics.median(trips)}), flush=True)
"""

# A DelayRelay on (127.0.0.1, 0) towards argv's target; print its port, run until stdin closes.
RELAY = """
import sys
from agp.serve.relay import DelayRelay
with DelayRelay(target=(sys.argv[1], int(sys.argv[2])), rtt_ms=float(sys.argv[3])) as relay:
    print(relay.address[1], flush=True)
    sys.stdin.read()
"""


def start(pair: NetnsPair, side: str, script: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return pair.popen(side, [sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def first_line(proc: subprocess.Popen, timeout_s: float = READY_S) -> str:
    """The process's first stdout line, or a failure naming its stderr, within `timeout_s`."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        pytest.fail(f"no output within {timeout_s} s; stderr: {proc.communicate(timeout=5)[1][-2000:]}")
    return line.strip()


def run_client(pair: NetnsPair, host: str, port: str, trips: int = 20) -> dict:
    client = start(pair, "a", CLIENT, host, port, str(trips))
    try:
        return json.loads(first_line(client))
    finally:
        netns.stop(client)


@needs_netns
def test_client_in_a_reaches_echo_in_b_and_cleanup_removes_both():
    with NetnsPair() as pair:
        names = [pair.name("a"), pair.name("b")]
        assert set(names) <= set(netns.namespaces())
        echo = start(pair, "b", ECHO, pair.address("b"))
        try:
            port = first_line(echo)
            result = run_client(pair, pair.address("b"), port)
        finally:
            netns.stop(echo)
        assert result["ok"], result
    assert not set(names) & set(netns.namespaces())


@needs_netns
def test_b_is_unreachable_from_the_host():
    """The pair's addresses exist only inside it: the test process (host namespace) cannot connect."""
    import socket
    with NetnsPair() as pair:
        echo = start(pair, "b", ECHO, pair.address("b"))
        try:
            port = int(first_line(echo))
            with pytest.raises(OSError):
                socket.create_connection((pair.address("b"), port), timeout=1.0).close()
        finally:
            netns.stop(echo)


@needs_netns
def test_relay_in_a_forwards_to_b_with_its_delay():
    rtt_ms = 5.0
    with NetnsPair() as pair:
        echo = start(pair, "b", ECHO, pair.address("b"))
        relay = None
        try:
            echo_port = first_line(echo)
            relay = start(pair, "a", RELAY, pair.address("b"), echo_port, str(rtt_ms))
            result = run_client(pair, "127.0.0.1", first_line(relay))
        finally:
            for proc in (relay, echo):
                if proc is not None:
                    netns.stop(proc)
    assert result["ok"], result
    print(f"relay in a -> echo in b at rtt {rtt_ms} ms: median {result['median_ms']:.3f} ms")
    # slack: two extra Python hops plus timer wake-ups on a loaded 2-core machine (see test_relay.py)
    assert rtt_ms <= result["median_ms"] < rtt_ms + 3.0, result


@needs_netns
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_error_inside_the_block_still_deletes_and_stops(error):
    with pytest.raises(error):
        with NetnsPair() as pair:
            names = [pair.name("a"), pair.name("b")]
            echo = start(pair, "b", ECHO, pair.address("b"))
            first_line(echo)
            raise error("boom")
    assert echo.poll() is not None, "the pair left its process running"
    assert not set(names) & set(netns.namespaces())


@needs_netns
def test_failed_setup_removes_what_it_made():
    """Side b's name already taken: entering fails with a one-line AGPError and side a is gone again."""
    pair = NetnsPair()
    netns._run_ip("netns", "add", pair.name("b"))
    try:
        with pytest.raises(AGPError, match="netns add"):
            pair.__enter__()
        assert pair.name("a") not in netns.namespaces()
    finally:
        netns._delete_netns(pair.name("b"))


@needs_netns
def test_remove_stale_deletes_only_dead_pids():
    dead = "agp-4194305-0-a"  # above Linux's largest pid (2**22), so never a live process
    live = f"agp-{os.getpid()}-stale-check"
    try:
        for name in (dead, live):
            netns._run_ip("netns", "add", name)
        assert dead in netns.remove_stale()
        assert live in netns.namespaces()
    finally:
        for name in (dead, live):
            if name in netns.namespaces():
                netns._delete_netns(name)


def test_bad_side_and_unset_pair_are_one_line_errors():
    pair = NetnsPair()
    with pytest.raises(AGPError, match="'a' or 'b'"):
        pair.address("c")
    with pytest.raises(AGPError, match="not set up"):
        pair.popen("a", ["true"])


def test_available_gives_a_reason():
    ok, why = netns.available()
    assert isinstance(ok, bool) and why and "\n" not in why
