"""Per-layer probe statistics at chosen positions, with optional tuned-lens translators.

The 262144-wide head is the cost (~168 M MACs per position per layer on the 270M, more than all
18 layers together), so: only a fixed subsample of positions is probed, layers go through the
head in groups as one batched matmul, and top-2 comes from two max passes instead of a sort.
`probe_stats` returns what `agp.backbone.lens.lens_stats` returns (kl, agree, margin; tested to
match it) plus the probe entropy and top-1 probability the CALM-style baselines need.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from agp.errors import AGPError


def hidden_at(bb, ids: list[int], layers: list[int], positions: list[int]) -> dict[int, np.ndarray]:
    """One forward pass; hidden states after l blocks at `positions`, {l: [P, H] float32}, l in layers
    (L = n_layers included when asked). Uses the segmented primitive `bb.start(...).run` like
    `bb.capture`, without paying the full-width head at every position."""
    want = sorted(set(int(x) for x in layers))
    if want and (want[0] < 0 or want[-1] > bb.n_layers):
        raise AGPError(f"probe layers must be within 0..{bb.n_layers}, got {want}")
    p = bb.start(mx.array([ids]))
    idx = mx.array(positions)
    h, at, got = p.h0, 0, {}
    if 0 in want:
        got[0] = h[0, idx]
    for stop in [x for x in want if x > 0]:
        h = p.run(h, at, stop)
        at = stop
        got[stop] = h[0, idx]
    mx.eval(got)
    out = {}
    for layer, v in got.items():
        a = np.asarray(v.astype(mx.float32))
        if not np.isfinite(a).all():
            raise AGPError(f"non-finite hidden states at layer {layer} (prompt of {len(ids)} tokens); "
                           f"the backbone or adapter weights are corrupt: re-run `agp run --stage adapter` "
                           f"or reconvert the model with `agp model convert`")
        out[layer] = a
    return out


@dataclass
class Translator:
    """Affine map h -> h @ W + b (tuned lens); identity when W is None."""
    W: np.ndarray | None = None
    b: np.ndarray | None = None

    def __call__(self, h):
        if self.W is None:
            return h
        if isinstance(h, mx.array):
            return h @ mx.array(self.W) + mx.array(self.b)
        return h @ self.W + self.b


def fit_translator(h_l: np.ndarray, h_final: np.ndarray, ridge: float = 1e-2) -> Translator:
    """Ridge least squares from layer-l hidden states to final hidden states (a cheap tuned lens:
    fitted to the final hidden state, not to the KL; the final norm and head then apply as usual).
    Inputs are scaled per feature first so Gemma's few huge-norm channels do not dominate."""
    if len(h_l) < 2:
        raise AGPError("need at least 2 train positions to fit a tuned-lens translator; add prompts")
    mu_x, mu_y = h_l.mean(0), h_final.mean(0)
    sx = h_l.std(0) + 1e-6
    X = (h_l - mu_x) / sx
    Y = h_final - mu_y
    n, d = X.shape
    A = X.T @ X / n + ridge * np.eye(d, dtype=np.float64)
    Wn = np.linalg.solve(A, X.T.astype(np.float64) @ Y / n)
    W = (Wn / sx[:, None]).astype(np.float32)
    b = (mu_y - mu_x @ W).astype(np.float32)
    return Translator(W, b)


def probe_stats(bb, hidden: dict[int, np.ndarray], final: np.ndarray, layers: list[int],
                translators: dict | None = None, group: int = 4) -> dict[str, np.ndarray]:
    """Statistics of each probe layer against the teacher (the head applied to `final`).

    hidden: {layer: [P, H]}; final: [P, H] hidden after the last layer. Returns [len(layers), P]
    arrays kl, agree, margin, entropy, p1 (probe top-1 probability), and [P] teacher_margin,
    teacher_entropy, teacher_top1."""
    f = bb.head(mx.array(final)).astype(mx.float32)
    logp = f - mx.logsumexp(f, axis=-1, keepdims=True)
    p = mx.exp(logp)
    top1 = mx.argmax(f, axis=-1)
    t_ent = -(p * logp).sum(-1)
    t1, t2 = _top2(logp)
    out = {k: [] for k in ("kl", "agree", "margin", "entropy", "p1")}
    for i in range(0, len(layers), group):
        chunk = layers[i:i + group]
        hs = []
        for layer in chunk:
            h = mx.array(hidden[layer])
            if translators and layer in translators:
                h = translators[layer](h)
            hs.append(h)
        lq = bb.head(mx.stack(hs)).astype(mx.float32)                  # [g, P, V]
        lq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
        q1, q2 = _top2(lq)
        res = {"kl": (p[None] * (logp[None] - lq)).sum(-1),
               "agree": mx.argmax(lq, axis=-1) == top1[None],
               "margin": mx.exp(q1) - mx.exp(q2),
               "entropy": -(mx.exp(lq) * lq).sum(-1),
               "p1": mx.exp(q1)}
        mx.eval(res)
        for k, v in res.items():
            out[k].append(np.asarray(v))
    stats = {k: np.concatenate(v, axis=0) for k, v in out.items()}
    stats["kl"] = np.maximum(stats["kl"], 0.0)
    stats["agree"] = stats["agree"].astype(bool)
    mx.eval(t1, t2, t_ent, top1)
    stats["teacher_margin"] = np.asarray(mx.exp(t1) - mx.exp(t2))
    stats["teacher_entropy"] = np.asarray(t_ent)
    stats["teacher_top1"] = np.asarray(top1)
    return stats


def _top2(logq: mx.array):
    """Largest and second-largest values along the last axis (two max passes: much cheaper than
    a sort over 262144 entries on the CPU)."""
    m1 = logq.max(-1)
    am = mx.argmax(logq, axis=-1)
    masked = mx.where(mx.arange(logq.shape[-1]) == am[..., None], -mx.inf, logq)
    return m1, masked.max(-1)
