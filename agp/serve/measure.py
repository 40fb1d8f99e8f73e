"""Two-host measurements shared by the serve stage and `agp bench serve`, all in one process.

  modes         single host (full, speculative) against the two-host layouts over one link: the
                naive split (every token crosses) and two-host speculative (one crossing per
                round), each at every emulated round trip (agp.serve.relay.DelayRelay), with
                tok/s, bytes per token, RTT p50/p99 and whether the tokens equal full depth
  ping          the round trip of an empty request on the link: what the protocol itself adds
  concurrency   many clients at once, each on its own session: every response accounted for,
                none lost, duplicated or answered to the wrong session or request
  restart       the server killed and restarted mid-session: the client reconnects, re-sends its
                spans, and the lossless output still equals full depth
  bad_frames    malformed, oversized, truncated and slow-drip frames each get their typed error
                and a closed connection while another session keeps being served
  sessions      many short sessions (open, one span, close): sessions held and RSS before/after
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
from tqdm import tqdm

from agp.runtime import GenerateArgs, Generator
from agp.serve import protocol as P
from agp.serve.client import Client
from agp.serve.relay import DelayRelay
from agp.serve.remote import RemoteSplit, remote_decoder
from agp.serve.server import ResumeServer, ServeArgs, ServerThread


@dataclass
class Setup:
    bb: object
    heads: object                   # RuntimeHeads with the draft (None: no speculative rows)
    split: int
    prompts: list                   # token id lists
    new_tokens: int
    args: GenerateArgs = field(default_factory=GenerateArgs)


def generate(setup: Setup, mode: str, decoder=None) -> tuple[list, dict]:
    ga = GenerateArgs(**{**setup.args.to_dict(), "max_new_tokens": setup.new_tokens, "stop_at_eos": False})
    out, summaries = [], []
    for ids in setup.prompts:
        g = Generator(setup.bb, mode, setup.heads if mode != "full" else None, ga, decoder=decoder)
        out.append([e.token for e in g.generate(ids)])
        summaries.append(g.summary)
    tokens = sum(s.tokens for s in summaries)
    decode = sum(s.decode_s for s in summaries)
    return out, {"tokens": tokens, "decode_s": decode, "tok_s": tokens / decode if decode else None,
                 "rounds": sum(s.rounds for s in summaries), "accepted": sum(s.accepted for s in summaries)}


def warm(setup: Setup, mode: str, decoder=None) -> None:
    """A few tokens first: the first forward pages the weights in (MLX loads them lazily), which
    would otherwise land in whichever row is measured first."""
    generate(Setup(setup.bb, setup.heads, setup.split, setup.prompts[:1], 4, setup.args), mode, decoder)


def single_host(setup: Setup, lossy: list) -> tuple[dict, list]:
    """The one-host rows and each mode's tokens (the references the two-host rows must equal)."""
    warm(setup, "full")
    full, row = generate(setup, "full")
    refs, rows = {"full": full}, [{"layout": "single host", "mode": "full", "rtt_ms": None, **row, "equal_full": True}]
    for mode in (["speculative"] if setup.heads is not None else []) + lossy:
        refs[mode], row = generate(setup, mode)
        rows.append({"layout": "single host", "mode": mode, "rtt_ms": None, **row, "equal_full": refs[mode] == full,
                     "agreement_full": agreement(refs[mode], full)})
    return refs, rows


def agreement(got: list, ref: list) -> float:
    """The share of emitted tokens equal to the reference's at the same position."""
    pairs = [(a, b) for g, r in zip(got, ref) for a, b in zip(g, r)]
    return sum(a == b for a, b in pairs) / max(1, len(pairs))


def routed_layouts(setup: Setup) -> list:
    """("two-host routed", "routed") when the run has the controller and the split is its late
    boundary (the lossy two-host mode splits at one of its boundaries)."""
    heads = setup.heads
    if heads is None or heads.controller is None:
        return []
    late = [int(x) for x in heads.meta.get("late_boundary", [])]
    return [("two-host routed", "routed")] if late and late[0] == setup.split else []


def modes(setup: Setup, rtts_ms: list, codec: str = "f32", progress: bool = True) -> dict:
    """Every layout on the same prompts; the two-host rows at each emulated RTT. Lossless rows must
    equal full depth; the lossy two-host rows must equal their single-host mode."""
    lossy = routed_layouts(setup)
    refs, rows = single_host(setup, [m for _, m in lossy])
    layouts = [("naive split", "full")] + ([("two-host speculative", "speculative")] if setup.heads is not None else [])
    layouts += lossy
    with ServerThread(ResumeServer(setup.bb, setup.split, ServeArgs(port=0))) as srv:
        warm(setup, layouts[-1][1], remote_decoder(layouts[-1][1], RemoteSplit(setup.bb, srv.address, setup.split)))
        for rtt in tqdm(rtts_ms, desc="two-host layouts", unit="rtt", disable=not progress):
            with DelayRelay(srv.address, rtt) as relay:
                for layout, mode in layouts:
                    link = RemoteSplit(setup.bb, relay.address, setup.split, codec=codec)
                    got, row = generate(setup, mode, remote_decoder(mode, link))
                    rows.append({"layout": layout, "mode": mode, "rtt_ms": rtt, "codec": codec, **row,
                                 "equal_full": got == refs["full"], "equal_single_host": got == refs[mode],
                                 "agreement_full": agreement(got, refs["full"]), "link": link.telemetry(row["tokens"])})
                    link.close()
    for r in rows:
        r["speed_vs_full"] = r["tok_s"] / rows[0]["tok_s"] if r["tok_s"] and rows[0]["tok_s"] else None
    return {"rows": rows, "split": setup.split, "codec": codec, "prompts": len(setup.prompts),
            "new_tokens": setup.new_tokens}


def ping(address, n: int = 500) -> dict:
    """Round trips of an empty request (PING) on one connection: the protocol's own latency."""
    with Client(address) as c:
        for _ in range(20):        # warm the connection and the server's thread
            c.call(P.Request(P.PING))
        t = []
        for _ in range(n):
            t0 = time.perf_counter()
            c.call(P.Request(P.PING)).raise_for_error()
            t.append((time.perf_counter() - t0) * 1e3)
    return {"n": n, "p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99))}


def concurrency(bb, split: int, clients: int, requests: int, timeout_s: float | None = None) -> dict:
    """`clients` threads, each its own connection and session, `requests` requests each (a resume
    of a fresh session every tenth, asking for the token every hundredth, pings otherwise): counts of
    lost (sent, never answered), duplicated and misrouted responses, of requests left unsent when
    the time bound ran out, and of resume tokens that differ from the same states resumed alone."""
    # the head is ~90% of a resume's time on these CPUs: a bound from the measured ~100 ms per token
    timeout_s = timeout_s or 60.0 + clients * requests * (0.1 / 100 + 0.01 / 10 + 0.002)
    state = boundary_state(bb, split)
    with ServerThread(ResumeServer(bb, split, ServeArgs(port=0, max_sessions=max(64, clients)))) as srv:
        alone = RemoteSplit(bb, srv.address, split)
        expect = alone.request(P.RESUME, state, flags=P.WANT_TOKEN).token
        alone.close()
        results = [None] * clients
        threads = [threading.Thread(target=_client_loop, args=(bb, srv.address, split, state, requests, results, i),
                                    daemon=True) for i in range(clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(max(1.0, timeout_s - (time.perf_counter() - t0)))
        wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    sent = sum(r["sent"] for r in done)
    return {"clients": clients, "requests_each": requests, "answered": sum(r["answered"] for r in done),
            "lost": sent - sum(r["answered"] for r in done), "unsent": clients * requests - sent,
            "unfinished_clients": clients - len(done), "timeout_s": timeout_s,
            "duplicated": sum(r["duplicated"] for r in done),
            "misrouted": sum(r["misrouted"] for r in done),
            "wrong_tokens": sum(sum(t != expect for t in r["tokens"]) for r in done),
            "errors": sum(r["errors"] for r in done), "wall_s": wall,
            "requests_per_s": sum(r["answered"] for r in done) / wall}


def boundary_state(bb, split: int, text: str = "def f(x):") -> np.ndarray:
    import mlx.core as mx
    p = bb.start(mx.array([bb.encode(text)]), bb.make_cache())
    h = p.run(p.h0, 0, split)[0].astype(mx.float32)
    mx.eval(h)
    return np.asarray(h)


def _client_loop(bb, address, split, state, requests, results, i) -> None:
    seen, out = set(), {"sent": 0, "answered": 0, "duplicated": 0, "misrouted": 0, "errors": 0, "tokens": []}
    link = RemoteSplit(bb, address, split)
    try:
        for j in range(requests):
            out["sent"] += 1
            if j % 10 == 0:          # a fresh session each time: the same states, so the same token
                link.reset()
                resp = link.request(P.RESUME, state, flags=P.WANT_TOKEN if j % 100 == 0 else 0)
                if j % 100 == 0:
                    out["tokens"].append(resp.token)
            else:
                resp = link.client.call(P.Request(P.PING, session=link.session))
            rid = link.client._next_id
            out["duplicated"] += resp.request_id in seen
            seen.add(resp.request_id)
            out["misrouted"] += resp.session != link.session or resp.request_id != rid
            out["answered"] += 1
    except Exception:                # noqa: BLE001 - counted: the caller reports lost requests
        out["errors"] += 1
    finally:
        link.client.close()
        results[i] = out


def restart(setup: Setup, kill_after: int = 8) -> dict:
    """Lossless two-host decoding with the server killed after `kill_after` tokens and a new one
    started on the same port: the tokens must still equal full depth."""
    full, _ = generate(Setup(setup.bb, None, setup.split, setup.prompts[:1], setup.new_tokens, setup.args), "full")
    srv = ServerThread(ResumeServer(setup.bb, setup.split, ServeArgs(port=0))).start()
    link = RemoteSplit(setup.bb, srv.address, setup.split, retries=20)
    ga = GenerateArgs(**{**setup.args.to_dict(), "max_new_tokens": setup.new_tokens, "stop_at_eos": False})
    mode = "speculative" if setup.heads is not None else "full"
    g = Generator(setup.bb, mode, setup.heads, ga, decoder=remote_decoder(mode, link))
    out = []
    try:
        for i, ev in enumerate(g.generate(setup.prompts[0])):
            out.append(ev.token)
            if i + 1 == kill_after:
                srv.stop()
                srv = ServerThread(ResumeServer(setup.bb, setup.split, ServeArgs(port=srv.address[1]))).start()
    finally:
        srv.stop()
    return {"mode": mode, "tokens": len(out), "equal_full": out == full[0], "reconnects": link.stats.reconnects,
            "resyncs": link.stats.resyncs, "fallbacks": 0}


BAD_FRAMES = {      # name -> (bytes sent, the typed reason the server must answer)
    "oversized": (struct.pack("<I", P.MAX_FRAME + 1), "oversize"),
    "malformed": (struct.pack("<I", 8) + b"\x09" * 8, "frame"),
    "truncated packet": (struct.pack("<I", 24) + P.REQ.pack(P.RESUME, 0, 0, 1, 7, 0, 1) + struct.pack("<I", 99), "frame"),
    "bad checksum": (None, "checksum"),
    "slow drip": (struct.pack("<I", 40) + b"x" * 3, "timeout"),
}


def bad_frames(bb, split: int, frame_timeout_s: float = 1.0) -> dict:
    """Each bad frame on its own connection while a good session keeps being served."""
    out = {}
    with ServerThread(ResumeServer(bb, split, ServeArgs(port=0, frame_timeout_s=frame_timeout_s))) as srv:
        good = RemoteSplit(bb, srv.address, split)
        state = boundary_state(bb, split)
        for name, (data, reason) in BAD_FRAMES.items():
            if data is None:
                data = corrupt_request(good, state)
            got = send_raw(srv.address, data, timeout=frame_timeout_s + 5)
            served = good.client.call(P.Request(P.PING, session=good.session)).status == 0
            out[name] = {"reason": got[0], "expected": reason, "closed": got[1], "others_served": served}
        good.close()
    return out


def corrupt_request(link: RemoteSplit, state) -> bytes:
    req = link._request(P.RESUME, state, (), P.WANT_TOKEN)
    body = bytearray(req.encode())
    body[-5] ^= 0xFF                 # a payload byte: the section CRC must catch it
    return P.LEN.pack(len(body)) + bytes(body)


def send_raw(address, data: bytes, timeout: float) -> tuple[str | None, bool]:
    """(the error reason the server answered, whether it then closed the connection)."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        head = s.recv(4, socket.MSG_WAITALL)
        if len(head) < 4:
            return None, True
        (n,) = struct.unpack("<I", head)
        resp = P.Response.decode(s.recv(n, socket.MSG_WAITALL))
        try:
            closed = s.recv(1) == b""
        except (socket.timeout, ConnectionError):
            closed = False
    return (resp.error[0] if resp.status else None), closed


def sessions(bb, split: int, n: int, progress: bool = True) -> dict:
    """n short sessions, each open + one span + close, on one connection: memory stays bounded."""
    state = boundary_state(bb, split)
    proc = psutil.Process()
    with ServerThread(ResumeServer(bb, split, ServeArgs(port=0))) as srv:
        link = RemoteSplit(bb, srv.address, split)
        link.request(P.RESUME, state)
        link.reset()
        before = proc.memory_info().rss
        for _ in tqdm(range(n), desc="short sessions", unit="session", disable=not progress):
            link.request(P.RESUME, state)
            link.reset()
        after = proc.memory_info().rss
        held = len(srv.server.sessions.table)
        link.close()
    return {"sessions": n, "held_after": held, "rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20,
            "rss_growth_mb": (after - before) / 2**20}
