"""Mode `speculative`: lossless self-speculative decoding with the shortlist exit head.

One round, with t0 the last emitted token (not yet in the cache) and n tokens cached:
  draft   feed t0, d1, ... through layers [0, E) one at a time, reusing those layers' KV of the
          whole context; the exit head at E proposes d_{j+1} only if its top-1 shortlist
          probability is >= `draft_min_confidence` (Kangaroo's adaptive stop), at most
          `draft_max` drafts. The last fed token's layer-E state is already the one verify needs.
  verify  the k+1 states at E (t0, d1..d_k) through [E, L) in one batched pass, and the full
          head on all k+1: y_j = the full-depth greedy token after t0, d1..d_j. With k = 0 the
          round is a plain full-depth step.
  accept  the longest prefix with d_{j+1} == y_j, then y_a (the correction, or the bonus token
          when every draft was accepted). Every layer's cache then holds n+k+1 tokens; the
          k-a rejected ones are rolled back exactly (agp.runtime.cache.WindowKVCache: mlx-lm's
          rotating caches cannot roll back once the sliding window has wrapped).
Every emitted token is a full-depth greedy token, so the output equals mode `full`.
"""
from __future__ import annotations

import mlx.core as mx

from agp.errors import AGPError
from agp.runtime.cache import make_rollback_cache, rollback
from agp.runtime.cost import Cost
from agp.runtime.full import Round, greedy, prefill


class SpeculativeDecoder:
    name = "speculative"

    def __init__(self, bb, costs, heads, args):
        if bb.arch != "gemma3_text":
            raise AGPError(f"mode speculative supports gemma3_text only (this model is {bb.arch})")
        if heads is None or heads.draft is None:
            raise AGPError("mode speculative needs the exit head from the runtime stage; "
                           "run `agp run --stage runtime`")
        self.bb, self.costs, self.head, self.args = bb, costs, heads.draft, args
        self.E = self.head.layer

    def make_cache(self):
        return make_rollback_cache(self.bb.model, slack=self.args.draft_max + 8)

    def start(self, ids: list[int]) -> None:
        self.cache = self.make_cache()
        prefill(self.bb, ids[:-1], self.cache)
        self.pending, self.context = ids[-1], len(ids)

    def draft(self, budget: int):
        """Layer-E states of t0, d1, ..., d_k and the drafts d1..d_k, plus their cost. A draft is
        proposed only while the exit head's top-1 shortlist probability is >= the threshold."""
        bb, E, head = self.bb, self.E, self.head
        k_max = max(0, min(self.args.draft_max, budget - 1))
        drafts, states, cost, t = [], [], Cost(), self.pending
        while True:
            p = bb.start(mx.array([[t]]), self.cache)
            h = p.run(p.h0, 0, E)
            states.append(h)
            cost += self.costs.layers(0, E, self.context + len(drafts))
            if len(drafts) >= k_max:
                break
            z = head.logits(h[:, -1])
            top = mx.argmax(z, axis=-1)
            conf = mx.exp(mx.max(z, axis=-1) - mx.logsumexp(z, axis=-1))
            mx.eval(top, conf)
            cost += Cost(head.macs(), head.macs())
            if float(conf.item()) < self.args.draft_min_confidence:
                break
            t = int(head.ids_np[int(top.item())])
            drafts.append(t)
        return drafts, states, cost

    def round(self, budget: int) -> Round:
        bb, E, L = self.bb, self.E, self.bb.n_layers
        drafts, states, cost = self.draft(budget)
        k = len(drafts)
        h = bb.run_layers(mx.concatenate(states, axis=1) if k else states[0], E, L, self.cache)
        y = greedy(bb.head(h))[0]
        mx.eval(y)
        y = y.tolist()
        a = 0
        while a < k and drafts[a] == y[a]:
            a += 1
        end = self.context + k      # keys after this round's k+1 positions
        cost += self.costs.layers(E, L, end, tokens=k + 1) + self.costs.head(k + 1)
        rollback(self.cache, k - a)
        out = drafts[:a] + [y[a]]
        self.pending, self.context = y[a], self.context + a + 1
        actions = ["draft_accepted"] * a + ["correction" if a < k else "full"]
        # every emitted token had its full-depth state computed (in the verify pass)
        return Round(out, actions, [L] * (a + 1), cost, drafted=k, accepted=a)
