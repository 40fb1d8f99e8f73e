"""Per-token cost accounting for generation: MACs and weight elements read, per segment.

Two costs, because they answer different questions. MACs (multiply-accumulates) count
arithmetic per token: a batched verify of k+1 positions costs k+1 times one position.
Weight reads count parameters streamed from memory per *pass*: a pass over k+1 positions
reads each weight once, which is what bounds decode time on a CPU or a GPU with small batches
(DESIGN.md: 1 token 98 ms, 5 tokens 157 ms). Speculative decoding saves weight reads, never MACs.
"""
from __future__ import annotations

from dataclasses import dataclass

from agp.backbone.macs import layer_macs, linear_macs


@dataclass
class Cost:
    """MACs and weight reads of one step (or a sum of steps)."""
    macs: int = 0
    reads: int = 0

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.macs + o.macs, self.reads + o.reads)


class CostModel:
    """Deterministic per-layer costs of a backbone (attention over the actual context included)."""

    def __init__(self, bb):
        self.n = bb.n_layers
        base, one = layer_macs(bb.model, 0), layer_macs(bb.model, 1)
        self.weights = [int(linear_macs(layer)) for layer in bb.model.model.layers]
        self.base = base
        self.att = [o - b for o, b in zip(one, base)]
        window = getattr(bb.model.args, "sliding_window", None)
        self.window = [window if getattr(layer.self_attn, "is_sliding", False) else None
                       for layer in bb.model.model.layers]
        self.head_macs = bb.head_macs()
        # (Gemma 4's shared-KV layers have no k/v projections of their own)
        self.kv_weights = [sum(int(linear_macs(layer.self_attn[name])) for name in ("k_proj", "v_proj")
                               if name in layer.self_attn) for layer in bb.model.model.layers]

    def layers(self, a: int, b: int, context: int, tokens: int = 1) -> Cost:
        """Layers [a, b) for `tokens` positions ending at `context` keys (one pass)."""
        macs = 0
        for i in range(a, b):
            for t in range(tokens):
                ctx = context - tokens + 1 + t
                span = min(ctx, self.window[i]) if self.window[i] else ctx
                macs += self.base[i] + self.att[i] * span
        return Cost(macs, sum(self.weights[a:b]))

    def kv_fill(self, a: int, b: int, tokens: int = 1) -> Cost:
        """State propagation over layers [a, b): only their k/v projections run."""
        return Cost(sum(self.kv_weights[a:b]) * tokens, sum(self.kv_weights[a:b]))

    def head(self, tokens: int = 1) -> Cost:
        return Cost(self.head_macs * tokens, self.head_macs)

    def full_token(self, context: int) -> Cost:
        """One plain full-depth decode step at `context` keys."""
        return self.layers(0, self.n, context) + self.head()
