"""Mode `full`: plain greedy decoding through the segmented forward, step for step as mlx-lm.

mlx-lm's `generate_step` prefills all prompt tokens but the last in chunks of 2048, then feeds
one token per step and takes the argmax of the log-probabilities; doing exactly that (same
caches, same chunking, same argmax over logits minus logsumexp) gives the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from agp.runtime.cost import Cost

PREFILL_STEP = 2048   # mlx-lm's default prefill_step_size


@dataclass
class Round:
    """What one decoder step emitted and what it cost."""
    tokens: list
    actions: list
    layers: list
    cost: Cost
    drafted: int = 0
    accepted: int = 0
    extra: dict = field(default_factory=dict)


def prefill(bb, ids: list[int], cache):
    """Full-depth forward of ids (no head), in mlx-lm's chunks, filling `cache`. Returns the
    final hidden state of the last id ([1, 1, H], before the final norm), or None for no ids."""
    last = None
    for a in range(0, len(ids), PREFILL_STEP):
        p = bb.start(mx.array([ids[a:a + PREFILL_STEP]]), cache)
        last = p.run(p.h0, 0, bb.n_layers)[:, -1:]
        mx.eval([c.state for c in cache], last)
    return last


def greedy(logits: mx.array) -> mx.array:
    """mlx-lm's greedy choice: argmax of logits - logsumexp over the last axis."""
    logits = logits.astype(mx.float32) if logits.dtype != mx.float32 else logits
    return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)


class FullDecoder:
    """One full-depth step per token."""

    name = "full"

    def __init__(self, bb, costs, heads=None, args=None):
        self.bb, self.costs = bb, costs

    def make_cache(self):
        return self.bb.make_cache()

    def start(self, ids: list[int]) -> None:
        self.cache = self.make_cache()
        prefill(self.bb, ids[:-1], self.cache)
        self.pending, self.context = ids[-1], len(ids)

    def round(self, budget: int) -> Round:
        bb = self.bb
        p = bb.start(mx.array([[self.pending]]), self.cache)
        h = p.run(p.h0, 0, bb.n_layers)
        tok = greedy(bb.head(h[:, -1]))
        mx.eval(tok)
        t = int(tok.item())
        cost = self.costs.full_token(self.context)
        self.pending, self.context = t, self.context + 1
        return Round([t], ["full"], [bb.n_layers], cost)
