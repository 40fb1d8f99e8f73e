"""Feature-level draft head (EAGLE-style): predict the next position's final hidden state.

EAGLE (Li et al., 2024) drafts at the feature level: from the final hidden state f_i of position
i (before the final norm) and the embedding of the token x_{i+1} that position emitted, a small
network predicts f_{i+1}; the LM head turns it into the draft of x_{i+2}. The token "one step
ahead" removes most of the uncertainty a feature-only extrapolation has. Here the network is one
block over the fused pair,

    x  = fc([norm_f(f_i), norm_e(e(x_{i+1}))])          2H -> H  (EAGLE's fusion layer)
    f' = x + mlp(norm_m(x))                               Gemma's gated-GELU MLP, width `inner`

and the head is the shortlist head (the backbone's final norm and the tied embedding rows of
the V most frequent lane tokens, plus a per-row bias), so a draft costs ~(2H^2 + 3 H inner + V H)
MACs instead of E layers and no full-width head. Unlike EAGLE's decoder layer the block has no
attention over earlier positions (no KV cache of its own to roll back): the true f_i already
carries the context, and later drafts of a round read the block's own prediction.

Trained with the exit head's loss (KL from the full-depth distribution restricted to the
shortlist, agp.heads.exit.distill) plus EAGLE's feature regression (smooth L1 between the
unit-RMS predicted and true next states; the unit RMS keeps Gemma's few huge-norm channels from
dominating, and keeps a fed-back prediction on the scale the block was trained on).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.gemma3_text import MLP, RMSNorm

from agp.backbone.segments import embed
from agp.config import ConfigMixin
from agp.heads.exit import ShortlistHead, top1_probability


@dataclass
class DraftHeadArgs(ConfigMixin):
    inner: int = 1024           # MLP width of the block
    feature_weight: float = 1.0  # weight of the smooth-L1 state regression next to the KL


class DraftParams(nn.Module):
    def __init__(self, hidden: int, inner: int, v: int):
        super().__init__()
        self.norm_f, self.norm_e, self.norm_m = RMSNorm(hidden), RMSNorm(hidden), RMSNorm(hidden)
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.mlp = MLP(hidden, inner)
        self.bias = mx.zeros((v,))


def unit_rms(x: mx.array) -> mx.array:
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + 1e-6)


class FeatureDraftHead(ShortlistHead):
    """`step(f, token)` -> (predicted next final state, shortlist logits of the token after it)."""

    stem = "draft_head"

    def __init__(self, bb, ids: np.ndarray, params: DraftParams | None = None, inner: int = 1024,
                 feature_weight: float = 1.0):
        self.model, self.inner, self.feature_weight = bb.model, int(inner), float(feature_weight)
        super().__init__(bb, ids, params or DraftParams(bb.hidden_size, self.inner, len(ids)))

    def predict(self, f: mx.array, e: mx.array) -> mx.array:
        p = self.params
        x = p.fc(mx.concatenate([p.norm_f(f), p.norm_e(e)], axis=-1))
        return x + p.mlp(p.norm_m(x))

    def logits(self, fe: mx.array) -> mx.array:
        """Shortlist logits from `fe` = [f_i, e(x_{i+1})] concatenated on the last axis (training form)."""
        f, e = fe[..., :self.hidden], fe[..., self.hidden:]
        return self.shortlist_logits(self.predict(f, e))

    def aux_loss(self, fe: mx.array, f_next: mx.array) -> mx.array:
        f, e = fe[..., :self.hidden], fe[..., self.hidden:]
        pred = unit_rms(self.predict(f, e))
        return self.feature_weight * nn.losses.smooth_l1_loss(pred, unit_rms(f_next), reduction="mean")

    def step(self, f: mx.array, token: int) -> tuple[mx.array, mx.array]:
        """One draft: the state after `token` from `f` (the state of the position that emitted it)."""
        e = embed(self.model, mx.array([[token]])).astype(f.dtype)
        nxt = self.predict(f, e)
        return nxt, self.shortlist_logits(nxt)

    def macs(self) -> int:
        H = self.hidden
        return 2 * H * H + 3 * H * self.inner + len(self.ids_np) * H

    def describe(self) -> dict:
        return {"kind": "feature", "inner": self.inner, "feature_weight": self.feature_weight}

    @classmethod
    def load(cls, bb, d: Path) -> tuple["FeatureDraftHead", dict]:
        meta, ids, w = cls.read(bb, d, "feature draft head")
        params = DraftParams(bb.hidden_size, int(meta["inner"]), len(ids))
        params.load_weights(list(w.items()))
        return cls(bb, ids, params, int(meta["inner"]), float(meta.get("feature_weight", 1.0))), meta


# --- training data ---------------------------------------------------------------------------------
def token_embeddings(bb, ids) -> np.ndarray:
    """The scaled input embeddings of `ids`, [N, H] float32."""
    e = embed(bb.model, mx.array(np.asarray(ids, np.int32))).astype(mx.float32)
    mx.eval(e)
    return np.asarray(e)


@dataclass
class Pairs:
    """Training pairs: x = [f_i, e(x_{i+1})], y = f_{i+1}, and per-prompt runs for chained drafts."""
    x: np.ndarray                    # [N, 2H]
    y: np.ndarray                    # [N, H]
    runs: list                       # per prompt: (first row in x, number of consecutive rows)


def feature_pairs(bb, final: np.ndarray, tokens: list, positions: list) -> Pairs:
    """Pairs from final states `final` (rows of every prompt's `positions`, concatenated) and the
    prompts' token ids. Only consecutive positions pair up (position p with p + 1)."""
    xs_f, xs_t, ys, runs, row, n = [], [], [], [], 0, 0
    for ids, pos in zip(tokens, positions):
        pos = list(pos)
        k = [j for j in range(len(pos) - 1) if pos[j + 1] == pos[j] + 1]
        if k:
            runs.append((n, len(k)))
            xs_f.append(final[row + np.array(k)])
            ys.append(final[row + np.array(k) + 1])
            xs_t += [ids[pos[j] + 1] for j in k]
            n += len(k)
        row += len(pos)
    if not ys:
        from agp.errors import AGPError
        raise AGPError("no consecutive positions to pair for the feature draft head; give longer prompts")
    f, y = np.concatenate(xs_f), np.concatenate(ys)
    return Pairs(np.concatenate([f, token_embeddings(bb, xs_t)], axis=1), y, runs)


def chain(head: FeatureDraftHead, pairs: Pairs, top1: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Drafts fed back `depth` times from every start, with the true tokens (what a round sees
    while its drafts are accepted): confidence and correctness [S, depth] (False / 0 past a run's
    end). `top1[r]` is the full-depth greedy token after pair row r's target position."""
    H = head.hidden
    n = len(pairs.x)
    conf, ok = np.zeros((n, depth), np.float32), np.zeros((n, depth), bool)
    valid_to = np.zeros(n, np.int64)            # rows of the same run after each row
    for a, m in pairs.runs:
        valid_to[a:a + m] = np.arange(m - 1, -1, -1)
    e = mx.array(pairs.x[:, H:])
    f = mx.array(pairs.x[:, :H])
    for d in range(depth):
        live = np.nonzero(valid_to >= d)[0]
        if not len(live):
            break
        src = live + d
        f_in = f[mx.array(live)] if d == 0 else fd[mx.array(live_idx(prev, live))]
        nxt = head.predict(f_in, e[mx.array(src)])
        z = head.shortlist_logits(nxt)
        p = top1_probability(z)
        tok = head.ids[mx.argmax(z, axis=-1)]
        mx.eval(nxt, p, tok)
        conf[live, d], ok[live, d] = np.asarray(p), np.asarray(tok) == top1[src]
        fd, prev = nxt, live
    return conf, ok


def live_idx(prev: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Positions of `live` (a subset of `prev`, both sorted) within `prev`."""
    return np.searchsorted(prev, live)
