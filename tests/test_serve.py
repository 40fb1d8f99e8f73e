"""The resume server over loopback on the tiny Gemma 3: two-host speculative and the naive split
equal single-host `full` token for token past the sliding window; a restarted server is caught
up from the client's spans; duplicates are answered from memory; bad frames get a typed error
and a closed connection while other sessions keep being served."""
from __future__ import annotations

import json
import socket
import struct
import time

import mlx.core as mx
import numpy as np
import pytest

from agp.backbone import load
from agp.errors import AGPError
from agp.heads.exit import ExitHead
from agp.runtime import GenerateArgs, Generator
from agp.runtime.heads import RuntimeHeads
from agp.serve import protocol as P
from agp.serve.client import Client, parse_address
from agp.serve.remote import RemoteSplit, remote_decoder
from agp.serve.server import ResumeServer, ServeArgs, ServerThread

mx.set_default_device(mx.cpu)
LOOP = "for i in range(3):\n    print(i)  # loop\n" * 20


@pytest.fixture(scope="module")
def bb(long_tiny_dir):
    return load(long_tiny_dir)


def heads_at(bb, layer):
    return RuntimeHeads(exits={layer: ExitHead.identity(bb, layer, np.arange(bb.vocab_size))}, draft_layer=layer)


def tokens(bb, ids, n, mode="full", heads=None, decoder=None, **kw):
    g = Generator(bb, mode, heads, GenerateArgs(max_new_tokens=n, stop_at_eos=False, **kw), decoder=decoder)
    return [e.token for e in g.generate(ids)], g.summary


@pytest.fixture()
def server(bb):
    with ServerThread(ResumeServer(bb, 3, ServeArgs(port=0, frame_timeout_s=1.0))) as srv:
        yield srv


@pytest.mark.parametrize("n_prompt", [12, 620])
def test_two_host_speculative_equals_full_past_the_window(bb, server, n_prompt):
    ids = bb.encode(LOOP)[:n_prompt]
    full, _ = tokens(bb, ids, 30)
    link = RemoteSplit(bb, server.address, 3)
    spec, s = tokens(bb, ids, 30, "speculative", heads_at(bb, 2), remote_decoder("speculative", link),
                     draft_max=4, draft_min_confidence=0.0)
    assert spec == full
    assert s.drafted > s.accepted > 0          # rejections rolled back on both hosts
    assert link.stats.round_trips == s.rounds                          # one crossing per round
    assert link.prefill_stats.round_trips == -(-(n_prompt - 1) // 2048)   # one per 2048-token prompt chunk
    naive, _ = tokens(bb, ids, 30, "full", decoder=remote_decoder("full", RemoteSplit(bb, server.address, 3)))
    assert naive == full


@pytest.mark.parametrize("n_prompt", [12, 620])
def test_two_host_lossy_modes_equal_their_single_host_runs(bb, server, n_prompt):
    """routed (split at its late boundary) and entropy (at its exit layer): the same tokens as on one
    host; only the tokens that go past the split cross, with the stopped ones waiting there."""
    from tests.test_runtime import tiny_controller
    heads = RuntimeHeads(exits={2: ExitHead.identity(bb, 2, np.arange(bb.vocab_size)),
                                3: ExitHead.identity(bb, 3, np.arange(bb.vocab_size))},
                         draft_layer=3, meta={"late_boundary": [3]})
    heads.controller = tiny_controller(2 * bb.hidden_size, 2, [1, 2])
    ids = bb.encode(LOOP)[:n_prompt]
    for mode, kw in (("routed", {}), ("entropy", {"entropy_threshold": 0.02})):
        one, s1 = tokens(bb, ids, 30, mode, heads, **kw)
        link = RemoteSplit(bb, server.address, 3)
        two, s2 = tokens(bb, ids, 30, mode, heads, remote_decoder(mode, link), **kw)
        assert two == one, mode
        deeper = sum(n for a, n in s1.actions.items() if a in ("escalate", "full", "revive_local"))
        assert link.stats.round_trips == deeper < len(one), (mode, s1.actions)
    heads.draft_layer = 2           # entropy exits at 2: a split at 3 is not one of its boundaries
    with pytest.raises(AGPError, match="boundaries"):
        Generator(bb, "entropy", heads, GenerateArgs(), decoder=remote_decoder("entropy", RemoteSplit(bb, server.address, 3)))


def test_a_restarted_server_is_caught_up_from_the_clients_spans(bb):
    ids = bb.encode(LOOP)[:40]
    full, _ = tokens(bb, ids, 24)
    args = ServeArgs(port=0)
    srv = ServerThread(ResumeServer(bb, 3, args)).start()
    link = RemoteSplit(bb, srv.address, 3, retries=20)
    g = Generator(bb, "speculative", heads_at(bb, 2), GenerateArgs(max_new_tokens=24, stop_at_eos=False,
                                                                     draft_min_confidence=0.0),
                  decoder=remote_decoder("speculative", link))
    out = []
    for i, ev in enumerate(g.generate(ids)):
        out.append(ev.token)
        if i == 8:          # kill it mid-session and start a fresh one on the same port
            srv.stop()
            srv = ServerThread(ResumeServer(bb, 3, ServeArgs(port=srv.address[1]))).start()
    srv.stop()
    assert out == full
    assert link.stats.reconnects >= 1 and link.stats.resyncs == 1


def test_a_duplicate_request_is_answered_from_memory(bb, server):
    link = RemoteSplit(bb, server.address, 3)
    ids = bb.encode("abc")
    p = bb.start(mx.array([ids]), bb.make_cache())
    h = np.asarray(p.run(p.h0, 0, 3)[0].astype(mx.float32))
    req = link._request(P.RESUME, h, (), P.WANT_TOKEN)
    first, again = link.client.call(req), link.client.call(req)
    assert first.token == again.token and not again.status
    assert server.server.stats.replays_answered == 1


def raw(address, data: bytes, timeout=5.0) -> P.Response:
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        head = s.recv(4, socket.MSG_WAITALL)
        (n,) = struct.unpack("<I", head)
        body = s.recv(n, socket.MSG_WAITALL)
        assert s.recv(1) == b""          # and then the server closed the connection
    return P.Response.decode(body)


@pytest.mark.parametrize("frame,reason", [
    (struct.pack("<I", P.MAX_FRAME + 1), "oversize"),
    (struct.pack("<I", 8) + b"\x09" * 8, "frame"),
    (struct.pack("<I", 24) + P.REQ.pack(P.RESUME, 0, 0, 1, 7, 0, 1) + struct.pack("<I", 99), "frame"),
    (struct.pack("<I", 40) + b"x" * 3, "timeout"),        # slow drip: the rest never comes
])
def test_bad_frames_get_a_typed_error_and_a_closed_connection(bb, server, frame, reason):
    link = RemoteSplit(bb, server.address, 3)     # another session, served throughout
    resp = raw(server.address, frame)
    assert resp.status and resp.error[0] == reason
    assert link.client.call(P.Request(P.PING)).status == 0


def test_a_packet_for_another_model_is_refused(bb, server, tiny_model_dir):
    other = load(tiny_model_dir["gemma4_text"])
    with pytest.raises(AGPError, match="another model"):
        RemoteSplit(other, server.address, 3)
    link = RemoteSplit(bb, server.address, 3)
    from agp.transfer.resume import Wire
    wire = Wire(other, 3, "f32", session=link.session)
    req = P.Request(P.RESUME, session=link.session, packets=[wire.packet(np.zeros((1, other.hidden_size), np.float32), 0)])
    resp = link.client.call(req)
    assert resp.status and resp.error[0] == "fingerprint"


def test_wrong_split_and_address_are_one_line_errors(bb, server):
    with pytest.raises(AGPError, match="--layers 4:"):
        RemoteSplit(bb, server.address, 4)
    with pytest.raises(AGPError, match="HOST:PORT"):
        parse_address("localhost")
    with pytest.raises(AGPError, match="needs a key"):
        ResumeServer(bb, 3, ServeArgs(host="0.0.0.0"))


def test_keyed_frames_are_authenticated(bb):
    key = b"k" * 32
    with ServerThread(ResumeServer(bb, 3, ServeArgs(port=0), key=key)) as srv:
        assert Client(srv.address, key=key).connect().hello()["keyed"]
        with pytest.raises(P.BadTag):   # refused, and the refusal is tagged with the server's key
            Client(srv.address, key=b"x" * 32).connect().call(P.Request(P.PING))
        assert srv.server.stats.errors["auth"] == 1


def test_agp_serve_and_generate_remote_through_the_cli(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`agp serve` in its own process, `agp generate --remote` here: the naive split's text
    equals single-host full depth, and the summary carries the link's telemetry."""
    import subprocess
    import sys
    from agp.cli import main
    model = tiny_model_dir["gemma3_text"]
    monkeypatch.setenv("AGP_RUNS", str(tmp_path / "runs"))
    env = {**__import__("os").environ}
    proc = subprocess.Popen([sys.executable, "-m", "agp.cli", "serve", "--layers", "3:6", "--port", "0",
                             "--model", model], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert "agp serve: layers 3:6" in line, line
        port = line.split(" on ")[1].split(";")[0].rsplit(":", 1)[1]
        assert main(["generate", "abc", "--model", model, "--max-new-tokens", "8", "--json"]) == 0
        local = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert main(["generate", "abc", "--model", model, "--max-new-tokens", "8", "--json",
                     "--remote", f"127.0.0.1:{port}"]) == 0
        remote = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    finally:
        proc.terminate()
        proc.wait(10)
    assert [e["token"] for e in remote[:-1]] == [e["token"] for e in local[:-1]]
    link = remote[-1]["summary"]["link"]
    assert link["round_trips"] >= 8 and link["reconnects"] == 0
    assert main(["generate", "abc", "--model", model, "--split", "3"]) == 2
    assert "--split applies only with --remote" in capsys.readouterr().err
    assert main(["generate", "abc", "--model", model, "--mode", "exit:3", "--remote", "127.0.0.1:1"]) == 2
    assert "single-host only" in capsys.readouterr().err


def test_a_verify_with_more_drafts_than_the_rollback_slack_is_refused_before_running(bb, server):
    link = RemoteSplit(bb, server.address, 3)
    states = np.zeros((18, bb.hidden_size), np.float32)
    resp = link.client.call(link._request(P.VERIFY, states, list(range(17)), 0))
    assert resp.status and resp.error[0] == "frame" and "at most 15" in resp.error[1]


def test_pipelined_requests_come_back_in_order(bb, server):
    c = Client(server.address).connect()
    ids = [c.send(P.Request(P.PING, session=i)) for i in range(1, 21)]
    got = [c.receive() for _ in ids]
    assert [r.request_id for r in got] == ids and [r.session for r in got] == list(range(1, 21))


def test_sessions_are_bounded_lru_and_expire(bb):
    with ServerThread(ResumeServer(bb, 3, ServeArgs(port=0, max_sessions=2, idle_s=0.5))) as srv:
        links = [RemoteSplit(bb, srv.address, 3) for _ in range(3)]
        p = bb.start(mx.array([bb.encode("ab")]), bb.make_cache())
        h = np.asarray(p.run(p.h0, 0, 3)[0].astype(mx.float32))
        for link in links:
            link.request(P.RESUME, h)
        table = srv.server.sessions
        assert len(table.table) == 2 and table.evicted == 1 and links[0].session not in table.table
        # the evicted session is rebuilt from the client's spans, not lost
        assert links[0].request(P.RESUME, h[:1], flags=P.WANT_TOKEN).token >= 0 and links[0].stats.resyncs == 1
        time.sleep(0.6)
        table.sweep()
        assert len(table.table) == 0 and table.expired == 2


def test_weights_still_lazy_on_the_loading_thread_are_served(tiny_model_dir):
    """MLX streams are per thread: a weight left unevaluated by the thread that loaded it (an adapter
    applied lazily, say) must not break the server's MLX thread ("no Stream(cpu, 0) in current thread")."""
    lazy = load(tiny_model_dir["gemma3_text"])
    norm = lazy.model.model.norm
    norm.weight = norm.weight * 1.0          # a lazy array on this thread's stream
    with ServerThread(ResumeServer(lazy, 3, ServeArgs(port=0))) as srv:
        link = RemoteSplit(lazy, srv.address, 3, timeout_s=20)
        ids = lazy.encode("abc")
        p = lazy.start(mx.array([ids]), lazy.make_cache())
        h = np.asarray(p.run(p.h0, 0, 3)[0].astype(mx.float32))
        assert link.request(P.RESUME, h, flags=P.WANT_TOKEN).token >= 0


@pytest.mark.parametrize("n_prompt", [1, 12, 620])
def test_two_host_feature_draft_equals_full(bb, server, n_prompt):
    """The EAGLE-style draft across hosts: verify returns the final state its next round reads."""
    from tests.test_runtime import feature_heads
    ids = bb.encode(LOOP)[:n_prompt]
    full, _ = tokens(bb, ids, 30)
    link = RemoteSplit(bb, server.address, 3)
    spec, s = tokens(bb, ids, 30, "speculative", feature_heads(bb), remote_decoder("speculative", link),
                     draft_max=4, draft_min_confidence=0.0)
    assert spec == full and link.stats.round_trips == s.rounds
