"""Rate–distortion by resumed continuation: what the resumed model does with a transferred state.

For one prompt, `teacher` runs full depth once: the logits after every position, the states at
each boundary, and the k-token greedy continuation. `resume` then sends the prompt's span through
a `Wire` (one codec, AGP-PTP packets, the Receiver's checks) into a fresh `Resumer`, and decodes k
tokens the way two hosts would: the sender computes each new token's state at b with its own
cache, the resumer continues from it with the cache it built from transferred states only.

Per position it returns the exact KL(full depth || resumed) over the whole vocabulary and whether
the resumed top-1 equals full depth's; per prompt the hidden cosine and MSE of the received span,
the continuation's agreement and first divergence, and the bytes on the wire (the whole packet,
headers included: amortised over the span's states, and per one-token continuation packet; the
f32 packets that carry attention-sink states exactly are counted apart, agp.transfer.resume).
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from agp.runtime.full import greedy
from agp.transfer.resume import SINK_LIMIT, Resumer, Sender, Wire, receiver_for


@dataclass
class Teacher:
    ids: list
    states: dict            # boundary -> [n, H] float32 states after that many blocks
    logits: mx.array        # [tail, V] full-depth logits after each of the last `tail` positions
    continuation: list      # k greedy full-depth tokens after the prompt
    tail: int = 0           # positions the logits cover (the whole span unless the span is long)
    logp: mx.array = None   # [n, V] log softmax(logits) and its exp, computed once per prompt so
    probs: mx.array = None  # each codec's KL costs one logsumexp instead of three (MLX's CPU exp is slow)
    top1: mx.array = None

    def __post_init__(self):
        self.logp = self.logits - mx.logsumexp(self.logits, axis=-1, keepdims=True)
        self.probs = mx.exp(self.logp)
        self.top1 = mx.argmax(self.logits, axis=-1)
        mx.eval(self.logits, self.logp, self.probs, self.top1)


@dataclass
class Resumed:
    kl: np.ndarray                  # [n] KL(full depth || resumed) per position, nats
    top1: np.ndarray                # [n] resumed top-1 == full depth's
    cosine: float                   # received span vs sent span, mean over positions
    mse: float
    continuation: list
    agreement: float                # continuation tokens equal to full depth's
    first_divergence: int | None    # index of the first differing continuation token
    span_bytes: int                 # the codec's packets of the span
    exact_bytes: int                # the f32 packets of the span's attention-sink positions
    exact_positions: int            # how many positions those carry
    step_bytes: float               # mean packet size of a one-token continuation step
    max_abs_logit_diff: float       # over the span (0 for a lossless resume)


def teacher(bb, ids: list, layers, k: int, tail: int | None = None) -> Teacher:
    """Full depth over `ids`: the states at `layers`, the logits after the last `tail` positions
    (all by default; a long span's full-vocabulary logits would not fit in memory) and k greedy
    tokens. The head runs on exactly the rows the resumer's head will, so an exact resume can be
    compared bit for bit."""
    cache = bb.make_cache()
    tail = min(tail or len(ids), len(ids))
    p, h, at, got = bb.states(mx.array([ids]), sorted(set(layers)), cache)
    logits = bb.head(p.run(h, at, bb.n_layers)[:, -tail:])
    cont, last = [], logits[0, -1:]
    for _ in range(k):
        tok = int(greedy(last)[0].item())
        cont.append(tok)
        last = bb.forward(mx.array([[tok]]), cache)[0, -1:]
    states = {layer: np.asarray(got[layer][0].astype(mx.float32)) for layer in got}
    return Teacher(list(ids), states, logits[0].astype(mx.float32), cont, tail)


def kl_and_top1(t: Teacher, got: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """Exact KL(full depth || resumed) over the vocabulary and top-1 agreement, per position."""
    z = got.astype(mx.float32)
    kl = (t.probs * (t.logp - (z - mx.logsumexp(z, axis=-1, keepdims=True)))).sum(-1)
    same = t.top1 == mx.argmax(z, axis=-1)
    mx.eval(kl, same)
    return np.maximum(np.asarray(kl), 0.0), np.asarray(same)


def resume(bb, layer: int, codec: str, t: Teacher, seed: int = 0, transport=None, adapter=None) -> Resumed:
    """The prompt's span over the wire at `layer` with `codec` (carrying `adapter`'s code when
    given), then len(t.continuation) tokens. `transport(packet) -> bytes` carries each packet
    (default: handed over in process)."""
    carry = transport or (lambda data: data)
    wire, sender = Wire(bb, layer, codec, seed=seed, adapter=adapter), Sender(bb, layer)
    resumer = Resumer(bb, layer, receiver_for(bb, adapter=adapter), adapter=adapter)
    sent = sender.states(t.ids)
    packets = wire.packets(sent, 0)
    logits, got = resumer.accept(*[carry(p) for p, _ in packets], tail=t.tail)
    kl, top1 = kl_and_top1(t, logits)
    diff = float(mx.abs(logits.astype(mx.float32) - t.logits).max().item())
    cont, steps, last = [], [], logits[-1:]
    for i in range(len(t.continuation)):
        tok = int(greedy(last)[0].item())
        cont.append(tok)
        if i + 1 == len(t.continuation):
            break
        step = [p for p, _ in wire.packets(sender.states([tok]), len(t.ids) + i)]
        steps.append(sum(len(p) for p in step))
        last = resumer.accept(*[carry(p) for p in step])[0][-1:]
    agree = [a == b for a, b in zip(cont, t.continuation)]
    cos = (got * sent).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(sent, axis=1) + 1e-12)
    return Resumed(kl, top1, float(cos.mean()), float(((got - sent) ** 2).mean()), cont,
                   float(np.mean(agree)) if agree else 1.0, next((i for i, ok in enumerate(agree) if not ok), None),
                   sum(len(p) for p, exact in packets if not exact), sum(len(p) for p, exact in packets if exact),
                   int((np.abs(sent).max(axis=1) > SINK_LIMIT).sum()), float(np.mean(steps)) if steps else float("nan"),
                   diff)
