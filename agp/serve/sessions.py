"""The server's sessions: each holds the KV of layers [b, L) for one client's sequence.

A session is created by the first packet of a span starting at position 0 and lives until the
client closes it, it idles past the timeout, or the table is full and it is the least recently
used. Its cache rolls back exactly (agp.runtime.cache.WindowKVCache), so a verify request can
hold t0, d1..d_k and keep only the accepted prefix, past the sliding window.

Replays: the last REPLAY responses of a session are kept by packet sequence number, so a
request re-sent after a lost response (same packets, same sequence numbers) is answered from
memory and never runs twice; anything older is refused by the Receiver's replay window.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from agp.ptp.packet import decode_packet
from agp.runtime.cache import make_rollback_cache, rollback
from agp.runtime.full import greedy
from agp.runtime.speculative import accepted
from agp.serve import protocol as P
from agp.transfer.resume import Resumer

REPLAY = 64


@dataclass
class Outcome:
    token: int = -1
    accepted: int = 0
    topk: np.ndarray | None = None
    state: np.ndarray | None = None


@dataclass
class Session:
    sid: int
    resumer: Resumer
    last_used: float = field(default_factory=time.monotonic)
    replies: OrderedDict = field(default_factory=OrderedDict)   # first packet's seq -> (digest, response)
    max_drafts: int = 15                                         # its cache's rollback slack

    def run(self, req: P.Request, packets: list) -> Outcome:
        """The request's spans (received Packets) through layers [b, L) and what the client asked for."""
        r = self.resumer
        if req.kind == P.VERIFY:
            return self._verify(req, packets)
        want_head = bool(req.flags & (P.WANT_TOKEN | P.WANT_TOPK))
        logits, _ = r.accept(*packets, tail=1, head=want_head)
        out = Outcome(accepted=r.next)
        if req.flags & P.WANT_TOKEN:
            out.token = int(greedy(logits[-1:]).item())
        if req.flags & P.WANT_TOPK and req.topk:
            out.topk = topk(logits[-1], req.topk)
        if req.flags & P.WANT_STATE:
            out.state = np.asarray(r.out[0, -1].astype(mx.float32))
        return out

    def _verify(self, req: P.Request, packets: list) -> Outcome:
        """Speculative verify: the span is t0, d1..d_k; accept the longest prefix the full-depth
        greedy tokens agree with, roll back the rest, answer the accepted count and the next token."""
        r, k = self.resumer, len(req.drafts)
        if k > self.max_drafts:
            raise P.MalformedFrame(f"{k} drafts in one verify; this server rolls back at most {self.max_drafts}")
        n = sum(p.identity.span_len for p in packets)
        if n != k + 1:
            raise P.MalformedFrame(f"verify span holds {n} positions, {k} drafts need {k + 1}")
        start = r.next
        logits, _ = r.accept(*packets)
        y = greedy(logits).tolist()
        a = accepted(req.drafts, y)
        rollback(r.cache, k - a, range(r.layer, r.bb.n_layers))
        r.next = start + a + 1
        out = Outcome(token=y[a], accepted=a)
        if req.flags & P.WANT_STATE:
            out.state = np.asarray(r.out[0, a].astype(mx.float32))
        if req.flags & P.WANT_TOPK and req.topk:
            out.topk = topk(logits[a], req.topk)
        return out


def topk(logits: mx.array, k: int) -> np.ndarray:
    z = np.asarray(logits.astype(mx.float32))
    k = min(k, len(z))
    ids = np.argpartition(-z, k - 1)[:k]
    ids = ids[np.argsort(-z[ids], kind="stable")]
    out = np.zeros(k, P.TOPK_ITEM)
    out["id"], out["logit"] = ids, z[ids]
    return out


class Sessions:
    """A bounded table of sessions: LRU eviction past `max_sessions`, idle ones dropped."""

    def __init__(self, bb, layer: int, receiver, max_sessions: int = 64, idle_s: float = 300.0, slack: int = 16):
        self.bb, self.layer, self.receiver = bb, layer, receiver
        self.max_sessions, self.idle_s, self.slack = max_sessions, idle_s, slack
        self.table: OrderedDict[int, Session] = OrderedDict()
        self.evicted = self.expired = self.created = 0

    def get(self, sid: int, first_packet) -> Session:
        self.sweep()
        s = self.table.get(sid)
        if s is None:
            start = decode_packet(first_packet).identity.span_start if first_packet is not None else None
            if start != 0:
                raise P.UnknownSession(f"session {sid:#x} is not held here (closed, evicted, expired or the server "
                                       f"restarted); re-send its spans from position 0")
            cache = make_rollback_cache(self.bb.model, slack=self.slack)
            s = self.table[sid] = Session(sid, Resumer(self.bb, self.layer, self.receiver, cache),
                                          max_drafts=self.slack - 1)
            self.created += 1
            while len(self.table) > self.max_sessions:
                self.table.popitem(last=False)
                self.evicted += 1
        self.table.move_to_end(sid)
        s.last_used = time.monotonic()
        return s

    def close(self, sid: int) -> bool:
        return self.table.pop(sid, None) is not None

    def sweep(self) -> None:
        now = time.monotonic()
        while self.table:
            sid, s = next(iter(self.table.items()))
            if now - s.last_used < self.idle_s:
                break
            del self.table[sid]
            self.expired += 1
