"""`agp serve` in one network namespace, `agp generate --remote` in another, joined by a veth pair
the test creates (and removes), through a 5 ms delay relay on the client's side: off loopback the
server needs a key, every frame is authenticated, and the two-host tokens equal single-host full
depth."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agp.serve import netns
from agp.serve.netns import NetnsPair, stop

ROOT = Path(__file__).resolve().parents[1]
OK, WHY = netns.available()
READY_S = 60.0
RELAY = """
import sys
from agp.serve.relay import DelayRelay
with DelayRelay(target=(sys.argv[1], int(sys.argv[2])), rtt_ms=float(sys.argv[3])) as relay:
    print(relay.address[1], flush=True)
    sys.stdin.read()
"""      # a fresh interpreter importing mlx and loading the model, on a loaded 2-core machine


def read_line(stream, deadline_s: float) -> str:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            return stream.readline()
    raise AssertionError(f"no line within {deadline_s:g} s")


@pytest.mark.skipif(not OK, reason=WHY)
def test_serve_and_generate_between_two_namespaces(tiny_model_dir, tmp_path):
    model = tiny_model_dir["gemma3_text"]
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AGP_RUNS": str(tmp_path / "runs")}
    agp = [sys.executable, "-m", "agp.cli"]
    local = subprocess.run(agp + ["generate", "def f(x):", "--model", model, "--max-new-tokens", "8", "--json"],
                           capture_output=True, text=True, env=env, timeout=120, check=True)
    with NetnsPair() as pair:
        host = pair.address("b")
        server = pair.popen("b", agp + ["serve", "--layers", "3:6", "--host", host, "--port", "0", "--model", model,
                                        "--key-file", str(key)], stderr=subprocess.PIPE, text=True, env=env)
        relay = None
        try:
            line = read_line(server.stderr, READY_S)
            assert f"on {host}:" in line and "(keyed)" in line, line
            port = line.split(f"on {host}:")[1].split()[0].rstrip(";")
            # the client reaches the server through a 5 ms delay relay inside its own namespace
            relay = pair.popen("a", [sys.executable, "-c", RELAY, host, port, "5"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
            relay_port = read_line(relay.stdout, READY_S).strip()
            remote = subprocess.run(pair.command("a", agp + ["generate", "def f(x):", "--model", model,
                                                            "--max-new-tokens", "8", "--json", "--remote",
                                                            f"127.0.0.1:{relay_port}", "--key-file", str(key)]),
                                    capture_output=True, text=True, env=env, timeout=120)
            assert remote.returncode == 0, remote.stderr[-2000:]
            unkeyed = subprocess.run(pair.command("a", agp + ["generate", "x", "--model", model, "--remote",
                                                             f"{host}:{port}"]),
                                     capture_output=True, text=True, env=env, timeout=120)
        finally:
            stop(server)
            if relay is not None:
                stop(relay)
    assert unkeyed.returncode != 0 and "(auth)" in unkeyed.stderr, unkeyed.stderr[-500:]
    tokens = [[json.loads(x)["token"] for x in out.splitlines()[:-1]] for out in (local.stdout, remote.stdout)]
    assert tokens[0] == tokens[1] and len(tokens[0]) > 0
    link = json.loads(remote.stdout.splitlines()[-1])["summary"]["link"]
    assert link["round_trips"] >= len(tokens[0]) and link["reconnects"] == 0
    assert link["rtt_ms_p50"] >= 5.0          # every round trip crossed the emulated link
