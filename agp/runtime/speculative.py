"""Mode `speculative`: lossless self-speculative decoding with a cheap draft and one verify pass.

One round, with t0 the last emitted token (not yet in the cache) and n tokens cached:
  draft   propose d1..d_k, each only if the draft's top-1 shortlist probability is >= 
          `draft_min_confidence` (Kangaroo's adaptive stop), at most `draft_max`. Two drafts:
          exit     (`speculative:exit`) feed t0, d1, ... through layers [0, E) one at a time, reusing
                   those layers' KV; the shortlist exit head at E proposes the next token. The layer-E
                   states are what verify continues from.
          feature  (`speculative:feature`, EAGLE-style) the feature draft head reads the final state
                   of the position that emitted t0 and t0's embedding, predicts the next final state
                   and proposes from it through the shortlist head; later drafts read its own
                   prediction. No backbone layer runs while drafting.
          `speculative` uses the draft the runtime stage's cost model chose (runtime.json).
  verify  the k+1 positions t0, d1..d_k through the layers the draft did not run ([E, L) or all),
          in one batched pass, and the full head on all k+1: y_j = the full-depth greedy token
          after t0, d1..d_j. With k = 0 the round is a plain full-depth step.
  accept  the longest prefix with d_{j+1} == y_j, then y_a (the correction, or the bonus token
          when every draft was accepted). Every layer's cache then holds n+k+1 tokens; the
          k-a rejected ones are rolled back exactly (agp.runtime.cache.WindowKVCache: mlx-lm's
          rotating caches cannot roll back once the sliding window has wrapped). The feature draft
          keeps the verified final state of y_a's position for the next round.
Every emitted token is a full-depth greedy token, so the output equals mode `full`.
"""
from __future__ import annotations

import mlx.core as mx

from agp.backbone.segments import embed
from agp.errors import AGPError
from agp.heads.exit import top1_probability
from agp.runtime.cache import make_rollback_cache, rollback
from agp.runtime.cost import Cost
from agp.runtime.full import Round, greedy, prefill

DRAFTS = ("exit", "feature")


def confident(z: mx.array, ids_np, threshold: float):
    """(token, proposed?) from shortlist logits z [1, V]: the top-1 and whether its probability
    reaches the threshold."""
    top = mx.argmax(z, axis=-1)
    conf = top1_probability(z)
    mx.eval(top, conf)
    return int(ids_np[int(top.item())]), float(conf.item()) >= threshold


class ExitDraft:
    """Drafts from the shortlist exit head at layer E over layers [0, E) of the real cache."""

    def __init__(self, dec, heads):
        if heads.draft is None:
            raise AGPError("the exit draft needs the exit head from the runtime stage; run `agp run --stage runtime`")
        self.dec, self.head, self.E = dec, heads.draft, heads.draft_layer

    def reset(self, last_state) -> None:
        pass

    def draft(self, k_max: int):
        """Drafts d1..d_k, the layer-E states of t0, d1..d_k (what verify continues from), cost."""
        dec, head, E = self.dec, self.head, self.E
        drafts, states, cost, t = [], [], Cost(), dec.pending
        while True:
            p = dec.bb.start(mx.array([[t]]), dec.cache)
            states.append(p.run(p.h0, 0, E))
            cost += dec.costs.layers(0, E, dec.context + len(drafts))
            if len(drafts) >= k_max:
                break
            t, ok = confident(head.logits(states[-1][:, -1]), head.ids_np, dec.args.draft_min_confidence)
            cost += Cost(head.macs(), head.macs())
            if not ok:
                break
            drafts.append(t)
        return drafts, mx.concatenate(states, axis=1) if len(states) > 1 else states[0], E, cost

    def verified(self, h, a: int) -> None:
        pass


class FeatureDraft:
    """Drafts from the EAGLE-style feature draft head; no backbone layer runs while drafting."""

    def __init__(self, dec, heads):
        if heads.feature is None:
            raise AGPError("the feature draft needs the feature draft head from the runtime stage; rerun "
                           "`agp run --stage runtime` (or use --mode speculative:exit)")
        self.dec, self.head, self.f = dec, heads.feature, None

    def reset(self, last_state) -> None:
        self.f = last_state          # final state of the position before t0 (None for a 1-token prompt)

    def draft(self, k_max: int):
        dec, head = self.dec, self.head
        drafts, cost, t, f = [], Cost(), dec.pending, self.f
        while f is not None and len(drafts) < k_max:
            f, z = head.step(f, t)
            cost += Cost(head.macs(), head.macs())
            t, ok = confident(z[:, -1], head.ids_np, dec.args.draft_min_confidence)
            if not ok:
                break
            drafts.append(t)
        return drafts, embed(dec.bb.model, mx.array([[dec.pending] + drafts])), 0, cost

    def verified(self, h, a: int) -> None:
        self.f = h[:, a:a + 1]      # the state whose head emitted the next round's t0


def accepted(drafts: list, y: list) -> int:
    """The longest prefix of the drafts that the verified greedy tokens agree with."""
    a = 0
    while a < len(drafts) and drafts[a] == y[a]:
        a += 1
    return a


class SpeculativeDecoder:
    name = "speculative"
    local_layers = None            # the layers whose KV this host holds (None: all)

    def __init__(self, bb, costs, heads, args):
        if bb.arch != "gemma3_text":
            raise AGPError(f"mode speculative supports gemma3_text only (this model is {bb.arch})")
        if heads is None:
            raise AGPError("mode speculative needs a draft head from the runtime stage; "
                           "run `agp run --stage runtime`")
        mode = getattr(args, "mode", "speculative") or "speculative"
        kind = mode.split(":", 1)[1] if ":" in mode else heads.draft_kind
        if kind not in DRAFTS:
            raise AGPError(f"unknown speculative draft '{kind}'; choose speculative:exit or speculative:feature")
        self.bb, self.costs, self.args, self.kind = bb, costs, args, kind
        self.name = mode
        self.drafter = (ExitDraft if kind == "exit" else FeatureDraft)(self, heads)

    def make_cache(self):
        return make_rollback_cache(self.bb.model, slack=self.args.draft_max + 8)

    def start(self, ids: list[int]) -> None:
        self.cache = self.make_cache()
        self.drafter.reset(prefill(self.bb, ids[:-1], self.cache))
        self.pending, self.context = ids[-1], len(ids)

    def verify(self, h, start: int, drafts: list) -> tuple[int, int, mx.array]:
        """Layers [start, L) and the full head on t0, d1..d_k in one pass: (accepted count a, the
        full-depth token after the accepted prefix, the final state [1, 1, H] of the position that
        emitted it). agp.serve's two-host decoder runs the same verify across a split."""
        h = self.bb.run_layers(h, start, self.bb.n_layers, self.cache)
        y = greedy(self.bb.head(h))[0]
        mx.eval(y, h)
        y = y.tolist()
        a = accepted(drafts, y)
        return a, y[a], h[:, a:a + 1]

    def round(self, budget: int) -> Round:
        L = self.bb.n_layers
        drafts, h, start, cost = self.drafter.draft(max(0, min(self.args.draft_max, budget - 1)))
        k = len(drafts)
        a, token, final = self.verify(h, start, drafts)
        end = self.context + k      # keys after this round's k+1 positions
        cost += self.costs.layers(start, L, end, tokens=k + 1) + self.costs.head(k + 1)
        rollback(self.cache, k - a, self.local_layers)
        self.drafter.verified(final, 0)
        out = drafts[:a] + [token]
        self.pending, self.context = token, self.context + a + 1
        actions = ["draft_accepted"] * a + ["correction" if a < k else "full"]
        # every emitted token had its full-depth state computed (in the verify pass)
        return Round(out, actions, [L] * (a + 1), cost, drafted=k, accepted=a)
