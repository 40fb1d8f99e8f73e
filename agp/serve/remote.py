"""The reflex side of a two-host split: layers [0, b) here, [b, L) on a resume server.

`RemoteSplit` is the client's half of a session: it sends spans of boundary states, keeps every
accepted span so that it can rebuild the session on a server that lost it (restarted, evicted),
and records the link's telemetry. Two decoders run on it, with the same constructor as the
runtime's decoders (`Generator(..., decoder=...)`):

  TwoHostSpeculative  lossless self-speculative decoding across hosts: the draft runs here (the
                      exit head at E <= b, or the feature draft head), the k+1 positions t0,
                      d1..d_k run [E, b) here and cross in one packet; the server verifies all
                      of them in one pass and answers the accepted count and the correction.
                      One round trip per round, not per token. Output equals mode `full`.
  NaiveSplit          the fixed split: every token's state crosses at b and its next token comes
                      back (one round trip per token, no routing): the baseline the routed split
                      must beat over the same link.
  TwoHostRouted       the lossy modes (routed, entropy) split at one of their boundaries (routed:
                      the late boundary B): accepted and continued tokens stop on this host and
                      never cross; an escalated one crosses with the states of the stopped tokens
                      waiting at b (their deferred KV catch-up, one batch). Its tokens equal the
                      single-host mode's, with one round trip per escalation.

Failures: a broken connection is reconnected (bounded retries) and the request re-sent as the
same bytes, which a server that already ran it answers from its replay memory. A server that no
longer holds the session answers `session`; the client then opens a new session and re-sends
every accepted span in the order it first sent them before re-trying the request. Nothing falls
back to local computation: the client either gets the server's answer or raises.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from agp.errors import AGPError
from agp.ptp.errors import PTPError
from agp.runtime.cost import Cost
from agp.runtime.early import EarlyExitDecoder
from agp.runtime.full import PREFILL_STEP, FullDecoder, Round
from agp.runtime.speculative import SpeculativeDecoder
from agp.serve import protocol as P
from agp.serve.client import Client
from agp.transfer.resume import Wire, backbone_quantization


@dataclass
class LinkStats:
    """What crossed the link and how long it took, for the run report."""
    round_trips: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    rtt_ms: list = field(default_factory=list)
    server_us: list = field(default_factory=list)      # (decode, infer, encode) per request
    reconnects: int = 0
    resyncs: int = 0
    positions_sent: int = 0

    def to_dict(self, tokens: int | None = None) -> dict:
        rtt = np.asarray(self.rtt_ms) if self.rtt_ms else np.zeros(1)
        srv = np.asarray(self.server_us) if self.server_us else np.zeros((1, 3))
        out = {"round_trips": self.round_trips, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
               "rtt_ms_p50": float(np.percentile(rtt, 50)), "rtt_ms_p99": float(np.percentile(rtt, 99)),
               "server_ms_p50": {k: float(np.median(srv[:, i])) / 1e3 for i, k in enumerate(("decode", "infer", "encode"))},
               "reconnects": self.reconnects, "resyncs": self.resyncs, "positions_sent": self.positions_sent}
        if tokens:
            out.update(bytes_up_per_token=self.bytes_up / tokens, bytes_down_per_token=self.bytes_down / tokens,
                       round_trips_per_token=self.round_trips / tokens)
        return out


class RemoteSplit:
    """One session's link from layers [0, b) here to the resume server holding [b, L)."""

    def __init__(self, bb, address, split: int, codec: str = "f32", key: bytes | None = None,
                 timeout_s: float = 30.0, retries: int = 3):
        self.bb, self.split, self.codec, self.retries = bb, int(split), codec, retries
        self.client = Client(address, key, timeout_s)
        self.stats = LinkStats()            # decode rounds (per-token figures come from these)
        self.prefill_stats = LinkStats()    # prompt spans and re-sends, kept apart
        self.in_prefill = False
        self.check_server(self._with_retries(self.client.hello))
        self.new_session()

    def check_server(self, info: dict) -> None:
        """Refuse a server that runs another model, tokenizer or split before anything is sent."""
        bb, host = self.bb, f"{self.client.address[0]}:{self.client.address[1]}"
        if info.get("model_fingerprint") != bb.fingerprint or info.get("quantization") != backbone_quantization(bb):
            raise AGPError(f"the resume server at {host} runs another model (fingerprint "
                           f"{str(info.get('model_fingerprint'))[:12]}, this one {bb.fingerprint[:12]}); start it "
                           f"with the same model and adapter")
        if info.get("tokenizer_fingerprint") != bb.tokenizer_fingerprint:
            raise AGPError(f"the resume server at {host} runs another tokenizer; start it with this model's")
        if list(info.get("layers", [])) != [self.split, bb.n_layers]:
            raise AGPError(f"the resume server at {host} holds layers {info.get('layers')}, this client splits at "
                           f"{self.split}: start it with --layers {self.split}:{bb.n_layers} or pass --split "
                           f"{(info.get('layers') or ['?'])[0]}")

    def new_session(self) -> None:
        self.session = random.getrandbits(63) | 1
        self.wire = Wire(self.bb, self.split, self.codec, session=self.session)
        self.history: list[np.ndarray] = []      # accepted spans in the order they were sent
        self.position = 0

    def reset(self) -> None:
        """End this session on the server (best effort) and start a new one."""
        if self.history:
            try:
                self.client.call(P.Request(P.CLOSE, session=self.session))
            except (OSError, PTPError):
                pass
        self.new_session()

    def request(self, kind: int, states: np.ndarray, drafts=(), flags: int = 0, resync: bool = True) -> P.Response:
        """Send a span (and drafts) and return the server's answer; `self.position` and the history
        advance by what the server kept."""
        for attempt in range(2):
            req = self._request(kind, states, drafts, flags)
            resp = self._with_retries(lambda: self._timed(req))
            if resp.status and resp.error[0] == "session" and attempt == 0 and resync:
                self.resync()
                continue
            resp.raise_for_error()
            kept = len(states) if kind == P.RESUME else resp.accepted + 1
            self.history.append(states[:kept])
            self.position += kept
            self.stats.positions_sent += len(states)
            return resp
        raise AGPError("unreachable")

    def _request(self, kind, states, drafts, flags) -> P.Request:
        packets = [p for p, _ in self.wire.packets(states, self.position)]
        return P.Request(kind, session=self.session, flags=flags, drafts=list(drafts), packets=packets)

    def _timed(self, req: P.Request) -> P.Response:
        stats = self.prefill_stats if self.in_prefill else self.stats
        up, down, t = self.client.bytes_sent, self.client.bytes_received, time.perf_counter()
        resp = self.client.call(req)
        stats.rtt_ms.append((time.perf_counter() - t) * 1e3)
        stats.round_trips += 1
        stats.bytes_up += self.client.bytes_sent - up
        stats.bytes_down += self.client.bytes_received - down
        if not resp.status:
            stats.server_us.append(resp.timings_us)
        return resp

    def telemetry(self, tokens: int) -> dict:
        """Decode figures per token, and the prefill's (prompt spans, re-sends) apart."""
        out = self.stats.to_dict(tokens)
        out["prefill"] = {k: self.prefill_stats.to_dict()[k] for k in ("round_trips", "bytes_up", "bytes_down")}
        out["reconnects"] += self.prefill_stats.reconnects
        return out

    def _with_retries(self, call):
        """`call()` with bounded reconnects: a connection the server (or the network) dropped is
        re-opened and the same request sent again."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except (OSError, P.PTPError) as e:
                if isinstance(e, P.RemoteError) or attempt == self.retries or not _transport_error(e):
                    raise
                self.stats.reconnects += 1
                time.sleep(min(0.05 * 2 ** attempt, 1.0))
                try:
                    self.client.connect()
                except ConnectionError:
                    continue
        raise AGPError("unreachable")

    def resync(self) -> None:
        """The server lost this session: open a new one and re-send every accepted span."""
        spans, was = self.history, self.in_prefill
        self.new_session()
        self.stats.resyncs += 1
        self.in_prefill = True           # re-sent spans are not this round's traffic
        try:
            for states in spans:
                self.request(P.RESUME, states, resync=False)
        finally:
            self.in_prefill = was

    def close(self) -> None:
        self.reset()
        self.client.close()


def _transport_error(e: Exception) -> bool:
    from agp.ptp.errors import TruncatedPacket
    return isinstance(e, (OSError, TruncatedPacket))


def to_numpy(h: mx.array) -> np.ndarray:
    h = h[0].astype(mx.float32)
    mx.eval(h)
    return np.asarray(h)


def prefill_split(bb, link: RemoteSplit, ids: list[int], cache, want_state: bool = False):
    """Layers [0, b) over the prompt in mlx-lm's chunks, each chunk's states sent as one span (so
    the server runs the same chunks). Returns the last position's final state [1, 1, H] when
    `want_state`, else None."""
    last = None
    link.in_prefill = True
    try:
        for a in range(0, len(ids), PREFILL_STEP):
            p = bb.start(mx.array([ids[a:a + PREFILL_STEP]]), cache)
            h = p.run(p.h0, 0, link.split)
            mx.eval([c.state for c in cache[:link.split]], h)
            resp = link.request(P.RESUME, to_numpy(h), flags=P.WANT_STATE if want_state else 0)
            if want_state:
                last = mx.array(resp.state)[None, None].astype(h.dtype)
    finally:
        link.in_prefill = False
    return last


class TwoHostSpeculative(SpeculativeDecoder):
    """Lossless speculative decoding with verify on the resume server (module docstring)."""

    def __init__(self, bb, costs, heads, args, link: RemoteSplit):
        super().__init__(bb, costs, heads, args)
        self.link, self.local_layers = link, range(link.split)
        if self.kind == "exit" and heads.draft_layer > link.split:
            raise AGPError(f"the exit draft at layer {heads.draft_layer} runs on this host: split at or after it "
                           f"(--split {heads.draft_layer}..{bb.n_layers - 1})")
        self.name = f"two-host {self.name}"

    def start(self, ids: list[int]) -> None:
        self.cache = self.make_cache()
        self.link.reset()
        self.drafter.reset(prefill_split(self.bb, self.link, ids[:-1], self.cache, self.kind == "feature"))
        self.pending, self.context = ids[-1], len(ids)

    def verify(self, h, start: int, drafts: list):
        h = self.bb.run_layers(h, start, self.link.split, self.cache)
        flags = P.WANT_STATE if self.kind == "feature" else 0
        resp = self.link.request(P.VERIFY, to_numpy(h), drafts, flags)
        final = mx.array(resp.state)[None, None].astype(h.dtype) if resp.state is not None else None
        return resp.accepted, resp.token, final


class NaiveSplit(FullDecoder):
    """Every token's boundary state crosses; the server answers its next token."""

    def __init__(self, bb, costs, heads, args, link: RemoteSplit):
        super().__init__(bb, costs, heads, args)
        self.link = link
        self.name = "naive split"

    def start(self, ids: list[int]) -> None:
        self.cache = self.make_cache()
        self.link.reset()
        prefill_split(self.bb, self.link, ids[:-1], self.cache)
        self.pending, self.context = ids[-1], len(ids)

    def round(self, budget: int) -> Round:
        p = self.bb.start(mx.array([[self.pending]]), self.cache)
        h = p.run(p.h0, 0, self.link.split)
        t = self.link.request(P.RESUME, to_numpy(h), flags=P.WANT_TOKEN).token
        cost = self.costs.full_token(self.context)
        self.pending, self.context = t, self.context + 1
        return Round([t], ["full"], [self.bb.n_layers], cost)


class TwoHostRouted(EarlyExitDecoder):
    """Lossy modes across the split (module docstring): tokens that stop before b never cross; a
    token that goes deeper than b crosses with every stopped token waiting at b (their deferred
    catch-up), and the server answers its full-depth token. The tokens are the single-host mode's."""

    def __init__(self, bb, costs, heads, args, link: RemoteSplit):
        super().__init__(bb, costs, heads, args)
        self.link, self.split = link, link.split
        if self.propagate:
            raise AGPError("two-host lossy modes catch skipped KV up (--skipped-kv catchup); propagate would "
                           "send every stopped state anyway")
        inner = self.bounds[1:-1]
        if self.split not in inner:
            raise AGPError(f"mode {self.mode} over two hosts splits at one of its boundaries {inner} (the "
                           f"{'late boundary B' if self.mode == 'routed' else 'exit layer'}); got --split {self.split}")
        self.name = f"two-host {self.name}"

    def start(self, ids: list[int]) -> None:
        self.cache = self.bb.make_cache()          # as the single-host mode
        self.link.reset()
        prefill_split(self.bb, self.link, ids[:-1], self.cache)
        self.pending, self.context = ids[-1], len(ids)
        self.lag = {b: [] for b in self.bounds}
        self.catchup_tokens, self.remote_token = 0, None

    def deeper(self, h, a: int, b: int):
        if b <= self.split:
            return super().deeper(h, a, b)
        h, cost = super().deeper(h, a, self.split) if a < self.split else (h, Cost())
        waiting, self.lag[self.split] = self.lag[self.split], []
        H = mx.concatenate(waiting + [h], axis=1) if waiting else h
        self.remote_token = self.link.request(P.RESUME, to_numpy(H), flags=P.WANT_TOKEN).token
        self.catchup_tokens += H.shape[1] - 1
        return None, cost + self.costs.layers(self.split, self.L, self.context, tokens=H.shape[1])

    def full_token(self, h):
        if h is not None:
            return super().full_token(h)
        tok, self.remote_token = self.remote_token, None
        return tok, self.costs.head()


def remote_decoder(mode: str, link: RemoteSplit):
    """The decoder factory `Generator(..., decoder=...)` takes for `mode` over `link`."""
    from functools import partial
    if mode == "full":
        return partial(NaiveSplit, link=link)
    if mode == "speculative" or mode.startswith("speculative:"):
        return partial(TwoHostSpeculative, link=link)
    if mode in ("routed", "entropy"):
        return partial(TwoHostRouted, link=link)
    raise AGPError(f"--remote runs modes full (the naive split), speculative (lossless two-host), routed and "
                   f"entropy (lossy: only deeper tokens cross); mode {mode} is single-host only")
