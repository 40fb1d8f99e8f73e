"""Lossy modes that stop some tokens early: `exit:L`, `entropy` (CALM) and `routed` (stage-2 controller).

Boundaries split the layers into segments, e.g. [0, D), [D, B), [B, L) for routed with decision
layer D and late boundary B. A token that stops at a boundary leaves the deeper layers' KV for
its position uncomputed. AGP never lets that KV go stale or missing: it keeps the stopped
token's hidden state at that boundary and runs it through the skipped segments later, in one
batch with the next token that goes deeper (deferred catch-up). The caught-up KV is exactly
what those layers compute from the exited state; the MACs are counted when they are spent.
With `skipped_kv="propagate"` (CALM's state propagation) the stopped token's state instead
fills only the K/V of every skipped layer at once (their k/v projections; no attention, no MLP):
the layer MACs are saved, and the deeper KV becomes approximate. `exit:L` never runs past L, so
it has nothing to catch up.

Per mode, what decides:
  exit:L     always the exit head at L.
  entropy    the exit head at E (the draft layer): exit when its top-1 probability >= threshold,
             else full depth (CALM's softmax-confidence rule, on the shortlist head).
  routed     the controller at D reads the hidden states at its read layers: accept_local -> exit
             head at D; continue_local -> exit head at the late boundary B; escalate -> full
             depth; revive_local -> the depth stage's revive operation at D (agp/runtime/revive.py:
             depth module over the states of blocks 0..D, shortlist emission), or full local depth
             when the run has no depth stage; an abstaining controller escalates.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from agp.errors import AGPError
from agp.heads.exit import top1_probability
from agp.runtime.cost import Cost
from agp.runtime.full import Round, greedy, prefill

SKIPPED_KV = ("catchup", "propagate")


class EarlyExitDecoder:
    def __init__(self, bb, costs, heads, args, mode: str | None = None):
        if bb.arch != "gemma3_text":
            raise AGPError(f"early-exit modes support gemma3_text only (this model is {bb.arch})")
        self.bb, self.costs, self.args, self.heads = bb, costs, args, heads
        self.L = bb.n_layers
        self.mode = mode or args.mode
        if heads is None:
            raise AGPError(f"mode {self.mode} needs the exit heads from the runtime stage; run `agp run --stage runtime`")
        if args.skipped_kv not in SKIPPED_KV:
            raise AGPError(f"--skipped-kv must be one of {', '.join(SKIPPED_KV)}, got '{args.skipped_kv}'")
        self.propagate = args.skipped_kv == "propagate"
        if self.mode.startswith("exit:"):
            try:
                layer = int(self.mode.split(":", 1)[1])
            except ValueError as e:
                raise AGPError(f"mode exit:L needs an integer layer, got '{self.mode}'") from e
            self.exit_head = heads.exit_at(layer)
            self.bounds = [0, layer]
        elif self.mode == "entropy":
            if heads.draft is None:
                raise AGPError("mode entropy needs the draft exit head; run `agp run --stage runtime`")
            self.exit_head = heads.draft
            self.bounds = [0, heads.draft_layer, self.L]
        elif self.mode == "routed":
            self._init_routed(heads)
        else:
            raise AGPError(f"unknown early-exit mode '{self.mode}'")
        self.name = self.mode + ("+propagate" if self.propagate and len(self.bounds) > 2 else "")

    def _init_routed(self, heads) -> None:
        if heads.controller is None:
            raise AGPError("mode routed needs the stage-2 controller; run `agp run --stage controller`")
        self.ctl, self.calib = heads.controller
        self.D = int(self.calib["decision_layer"])
        self.read = [int(x) for x in self.calib["read_layers"]]
        late = [int(x) for x in heads.meta.get("late_boundary", [])] or [self.L - 3]
        self.B = late[0]
        if not self.D < self.B < self.L or any(r > self.D for r in self.read):
            raise AGPError(f"routed needs read layers <= D < B < L, got read {self.read}, D {self.D}, B {self.B}")
        self.accept_head, self.late_head = heads.exit_at(self.D), heads.exit_at(self.B)
        rv = getattr(heads, "reviver", None)
        self.reviver = rv if rv is not None and rv.layer == self.D else None   # revive at B: not wired yet
        self.bounds = [0, self.D, self.B, self.L]

    # --- state ------------------------------------------------------------------------------
    def start(self, ids: list[int]) -> None:
        self.cache = self.bb.make_cache()
        prefill(self.bb, ids[:-1], self.cache)
        self.pending, self.context = ids[-1], len(ids)
        self.lag = {b: [] for b in self.bounds}      # boundary -> states of stopped tokens waiting there
        self.catchup_tokens = 0

    def first_segment(self, t: int):
        """Layers [0, bounds[1]) for token t; the states at routed read layers come with it."""
        p = self.bb.start(mx.array([[t]]), self.cache)
        extra = set(self.reviver.sources) if getattr(self, "reviver", None) is not None else set()
        stops = sorted({x for x in set(getattr(self, "read", [])) | extra if 0 < x < self.bounds[1]} | {self.bounds[1]})
        h, at, got = p.h0, 0, {0: p.h0}
        for s in stops:
            h = p.run(h, at, s)
            got[s], at = h, s
        cost = self.costs.layers(0, self.bounds[1], self.context)
        return h, got, cost

    def deeper(self, h, a: int, b: int):
        """Run the current state from boundary a to b, catching up every token waiting on the way."""
        cost = Cost()
        bounds = [x for x in self.bounds if a <= x <= b]
        for lo, hi in zip(bounds, bounds[1:]):
            waiting = self.lag[lo]
            self.lag[lo] = []
            H = mx.concatenate(waiting + [h], axis=1) if waiting else h
            out = self.bb.run_layers(H, lo, hi, self.cache)
            n = H.shape[1]
            cost += self.costs.layers(lo, hi, self.context, tokens=n)
            self.catchup_tokens += n - 1
            if n > 1 and hi < self.L:
                self.lag[hi].append(out[:, :-1])
            h = out[:, -1:]
        return h, cost

    def stop_at(self, h, boundary: int) -> Cost:
        """The token stopped at `boundary`: queue its state for catch-up, or propagate it now."""
        if not (boundary < self.L and boundary in self.lag and len(self.bounds) > 2):
            return Cost()
        if self.propagate:
            self.bb.fill_kv(h, boundary, self.L, self.cache)
            return self.costs.kv_fill(boundary, self.L)
        self.lag[boundary].append(h)
        return Cost()

    # --- emit -------------------------------------------------------------------------------
    def exit_token(self, head, h):
        z = head.logits(h[:, -1])
        top = mx.argmax(z, axis=-1)
        p1 = top1_probability(z)
        mx.eval(top, p1)
        return int(head.ids_np[int(top.item())]), float(p1.item()), Cost(head.macs(), head.macs())

    def full_token(self, h):
        tok = greedy(self.bb.head(h[:, -1]))
        mx.eval(tok)
        return int(tok.item()), self.costs.head()

    def round(self, budget: int) -> Round:
        h, got, cost = self.first_segment(self.pending)
        if self.mode.startswith("exit:"):
            t, _, c = self.exit_token(self.exit_head, h)
            action, layers = "exit", self.bounds[1]
        elif self.mode == "entropy":
            t, p1, c = self.exit_token(self.exit_head, h)
            action, layers = "exit", self.bounds[1]
            if p1 < self.args.entropy_threshold:
                h, c2 = self.deeper(h, self.bounds[1], self.L)
                t, c3 = self.full_token(h)
                c, action, layers = c + c2 + c3, "full", self.L
            else:
                c = c + self.stop_at(h, self.bounds[1])
        else:
            t, action, layers, c = self.routed(h, got)
        self.pending, self.context = t, self.context + 1
        return Round([t], [action], [layers], cost + c)

    def routed(self, h, got):
        from agp.heads.controller import route_decisions
        from agp.oracle.labels import ROUTES
        feats = np.concatenate([np.asarray(got[r][0, -1].astype(mx.float32)) for r in self.read])[None]
        dec = route_decisions(self.ctl, self.calib, feats)
        gate = self.args.routed_gate
        abstain = bool(dec["abstain"][0]) if gate is None else float(dec["confidence"][0]) < gate
        action = "escalate" if abstain else ROUTES[int(dec["action"][0])]
        cost = Cost(self.ctl.macs(), self.ctl.macs())
        if action == "accept_local":
            t, _, c = self.exit_token(self.accept_head, h)
            return t, action, self.D, cost + c + self.stop_at(h, self.D)
        if action == "continue_local":
            h, c2 = self.deeper(h, self.D, self.B)
            t, _, c = self.exit_token(self.late_head, h)
            return t, action, self.B, cost + c2 + c + self.stop_at(h, self.B)
        if action == "revive_local" and self.reviver is not None:
            t, _, c = self.reviver.token(got)
            # the plain state at D (not the revived one) stands in for the deeper layers' KV
            return t, action, self.D, cost + c + self.stop_at(h, self.D)
        # escalate, and revive_local without a depth stage (full local depth)
        h, c2 = self.revive(h) if action == "revive_local" else self.deeper(h, self.D, self.L)
        t, c3 = self.full_token(h)
        return t, action, self.L, cost + c2 + c3

    def revive(self, h):
        """revive_local when the run has no depth stage: full local depth."""
        return self.deeper(h, self.D, self.L)
