"""Per-layer probe statistics at chosen positions, with optional tuned-lens translators.

The vocabulary-wide head (embedded.VOCAB_SIZE rows) is the cost (~168 M MACs per position per layer on the 270M, more than all
18 layers together), so: only a fixed subsample of positions is probed, layers go through the
head in groups as one batched matmul, and top-2 comes from a masked max pass instead of a sort.
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
    (L = n_layers included when asked). The segmented pass of `bb.capture`, stopped at the deepest
    layer asked for and without paying the full-width head at every position."""
    idx = mx.array(positions)
    _, _, _, states = bb.states(mx.array([ids]), layers, what="probe")
    got = {layer: h[0, idx] for layer, h in states.items()}
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


def fit_translator(h_l: np.ndarray, h_final: np.ndarray, ridge: float = 0.1) -> Translator:
    """Ridge least squares from layer-l hidden states to final hidden states (a cheap tuned lens:
    fitted to the final hidden state, not to the KL; the final norm and head then apply as usual).
    Residual form, as in the tuned lens: the ridge shrinks the map towards the identity (plus a
    mean shift), so a layer the raw lens already reads well is not made worse. Inputs are scaled
    per feature first so Gemma's few huge-norm channels do not dominate."""
    if len(h_l) < 2:
        raise AGPError("need at least 2 train positions to fit a tuned-lens translator; add prompts")
    mu_x, sx = h_l.mean(0), h_l.std(0) + 1e-6
    X = (h_l - mu_x) / sx
    R = h_final - h_l
    mu_r = R.mean(0)
    n, d = X.shape
    A = X.T @ X / n + ridge * np.eye(d, dtype=np.float64)
    Wn = np.linalg.solve(A, X.T.astype(np.float64) @ (R - mu_r) / n)
    Wr = (Wn / sx[:, None]).astype(np.float32)
    W = Wr + np.eye(d, dtype=np.float32)
    b = (mu_r - mu_x @ Wr).astype(np.float32)
    return Translator(W, b)


def probe_stats(bb, hidden: dict[int, np.ndarray], final: np.ndarray, layers: list[int],
                translators: dict | None = None, group: int = 2, full_layers=None,
                method: str = "fast") -> dict[str, np.ndarray]:
    """Statistics of each probe layer against the teacher (the head applied to `final`).

    hidden: {layer: [P, H]}; final: [P, H] hidden after the last layer. Returns [len(layers), P]
    arrays kl, agree, and, for layers in `full_layers` (default all; NaN elsewhere), margin,
    entropy and p1 (probe top-1 probability); plus [P] teacher_margin, teacher_entropy,
    teacher_top1. The head matmul runs in MLX; the passes over the vocabulary run in numpy.
    method "fast" (docs/labels.md "Oracle speed"): logits read in place (no copy), the next group's
    head matmul runs while numpy reduces the current one, the max comes from the arg-max, exp and
    sum work in place, and a probe layer that needs only KL and agreement costs its matmul plus an
    arg-max, one fused cross-term/log-sum-exp pass and nothing else; "reference" is the earlier
    path, kept to measure against (`agp bench oracle`)."""
    if method not in ("fast", "reference"):
        raise AGPError(f"unknown probe method {method!r}; use 'fast' or 'reference'")
    full_layers = set(layers if full_layers is None else full_layers)
    states = [_translated(hidden[layer], translators, layer) for layer in layers]
    if method == "reference":
        return _probe_stats_reference(bb, states, final, layers, group, full_layers)
    return _probe_stats_fast(bb, states, final, layers, group, full_layers)


def _translated(h: np.ndarray, translators: dict | None, layer: int) -> mx.array:
    h = mx.array(h)
    if translators and layer in translators:
        h = translators[layer](h)
    return h


def _probe_stats_fast(bb, states, final, layers, group, full_layers) -> dict[str, np.ndarray]:
    n, P = len(layers), len(final)
    out = _empty(n, P)
    pending = bb.head(mx.array(final))
    mx.async_eval(pending)
    groups = [list(range(i, min(i + group, n))) for i in range(0, n, group)]
    teacher = None
    for k in range(len(groups) + 1):
        current = pending
        if k < len(groups):                        # the next matmul runs while numpy reduces this one
            pending = bb.head(mx.stack([states[row] for row in groups[k]]))
            mx.async_eval(pending)
        mx.eval(current)
        z = np.asarray(current)                    # a view: no copy of the [.., P, V] logits
        if teacher is None:
            teacher = _Teacher.of(z)
            continue
        for j, row in enumerate(groups[k - 1]):
            _probe_row(out, row, z[j], teacher, layers[row] in full_layers)
    out.update(teacher.summary())
    return out


@dataclass
class _Teacher:
    p: np.ndarray              # [P, V] teacher probabilities
    top1: np.ndarray
    logp_sum: np.ndarray       # sum_v p_v log p_v
    p1: np.ndarray
    p2: np.ndarray
    entropy: np.ndarray

    @classmethod
    def of(cls, z: np.ndarray) -> "_Teacher":
        zmax, top1, lse, ez, m2 = _vocab_pass(z, True)
        p = np.exp(z - lse.astype(np.float32)[:, None])
        return cls(p, top1, ez - lse, np.exp(zmax - lse), np.exp(m2 - lse), lse - ez)

    def summary(self) -> dict:
        return {"teacher_margin": (self.p1 - self.p2).astype(np.float32),
                "teacher_entropy": self.entropy.astype(np.float32), "teacher_top1": self.top1}


def _probe_row(out: dict, row: int, z: np.ndarray, teacher: _Teacher, full: bool) -> None:
    """KL(teacher || probe) and agreement for one probe layer's logits z [P, V]; the full stats
    (margin, entropy, p1) too when `full`. z may be overwritten."""
    if full:
        zmax, top1, lse, ez, m2 = _vocab_pass(z, True)
        cross = np.einsum("pv,pv->p", teacher.p, z, dtype=np.float64)
        out["p1"][row] = np.exp(zmax - lse)
        out["margin"][row] = out["p1"][row] - np.exp(m2 - lse)
        out["entropy"][row] = lse - ez
    else:
        rows = np.arange(len(z))
        top1 = z.argmax(-1)
        zmax = z[rows, top1]
        cross = np.einsum("pv,pv->p", teacher.p, z, dtype=np.float64)
        np.subtract(z, zmax[:, None], out=z)
        np.exp(z, out=z)
        lse = zmax + np.log(z.sum(-1, dtype=np.float64))
    out["kl"][row] = np.maximum(teacher.logp_sum - (cross - lse), 0.0)
    out["agree"][row] = top1 == teacher.top1


def _empty(n: int, P: int) -> dict:
    out = {k: np.full((n, P), np.nan, np.float32) for k in ("kl", "margin", "entropy", "p1")}
    out["agree"] = np.zeros((n, P), bool)
    return out


def _probe_stats_reference(bb, states, final, layers, group, full_layers) -> dict[str, np.ndarray]:
    f = _np(bb.head(mx.array(final)))                                  # [P, V]
    t_max, t_top1, t_lse, t_ez, t_m2 = _vocab_pass(f)
    logp_sum = t_ez - t_lse                                            # sum_v p_v log p_v = E_p[z] - lse
    p = np.exp(f - t_lse.astype(np.float32)[:, None], out=f)           # teacher probabilities, in place
    n = len(layers)
    out = _empty(n, len(final))
    for i in range(0, n, group):
        z = _np(bb.head(mx.stack(states[i:i + group])))                # [g, P, V]
        for j in range(len(z)):
            row = i + j
            full = layers[row] in full_layers
            zmax, top1, lse, ez, m2 = _vocab_pass(z[j], full)
            out["kl"][row] = np.maximum(logp_sum - (np.einsum("pv,pv->p", p, z[j]) - lse), 0.0)
            out["agree"][row] = top1 == t_top1
            if full:
                out["p1"][row] = np.exp(zmax - lse)
                out["margin"][row] = out["p1"][row] - np.exp(m2 - lse)
                out["entropy"][row] = lse - ez
    t_p1 = np.exp(t_max - t_lse)
    out["teacher_margin"] = (t_p1 - np.exp(t_m2 - t_lse)).astype(np.float32)
    out["teacher_entropy"] = (t_lse - t_ez).astype(np.float32)
    out["teacher_top1"] = t_top1
    return out


def _np(a: mx.array) -> np.ndarray:
    a = a.astype(mx.float32)
    mx.eval(a)
    return np.array(a, copy=True)


def _vocab_pass(z: np.ndarray, full: bool = True):
    """Per row of z [P, V]: max, argmax, logsumexp, and when `full`: E_softmax(z)[z] and the
    second-largest value (all in float64 accumulators where it matters)."""
    zmax = z.max(-1)
    top1 = z.argmax(-1)
    e = np.exp(z - zmax[:, None])
    s = e.sum(-1, dtype=np.float64)
    lse = (zmax + np.log(s)).astype(np.float64)
    if not full:
        return zmax, top1, lse, None, None
    ez = np.einsum("pv,pv->p", e, z, dtype=np.float64) / s
    rows = np.arange(len(z))
    saved = z[rows, top1].copy()
    z[rows, top1] = -np.inf
    m2 = z.max(-1)
    z[rows, top1] = saved
    return zmax, top1, lse, ez, m2
