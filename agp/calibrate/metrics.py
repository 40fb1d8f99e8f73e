"""Classification and calibration metrics in plain numpy (no sklearn)."""
from __future__ import annotations

import numpy as np

from agp.errors import AGPError


def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """[k, k] counts, rows = true class, columns = predicted."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (np.asarray(y, int), np.asarray(pred, int)), 1)
    return m


def per_class(y, pred, names) -> dict:
    """Precision, recall, F1 and support per class; macro-F1 and accuracy; the confusion matrix."""
    k = len(names)
    m = confusion(y, pred, k)
    tp = np.diag(m).astype(float)
    prec = np.divide(tp, m.sum(0), out=np.zeros(k), where=m.sum(0) > 0)
    rec = np.divide(tp, m.sum(1), out=np.zeros(k), where=m.sum(1) > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(k), where=(prec + rec) > 0)
    present = m.sum(1) > 0      # macro over classes present in the truth
    return {"classes": {c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                            "support": int(m[i].sum())} for i, c in enumerate(names)},
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "accuracy": float(tp.sum() / max(m.sum(), 1)), "confusion": m.tolist()}


def macro_f1(y, pred, k: int) -> float:
    return per_class(y, pred, [str(i) for i in range(k)])["macro_f1"]


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence, `bins` equal-width bins on [0, 1]."""
    probs = np.asarray(probs, float)
    if probs.ndim != 2 or len(probs) != len(y) or not np.isfinite(probs).all():
        raise AGPError(f"ECE needs finite [N, K] probabilities matching {len(y)} labels, got {probs.shape}")
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> dict:
    """Per-bin mean confidence, accuracy and count (for the reliability diagram)."""
    conf = np.asarray(probs).max(1)
    correct = np.asarray(probs).argmax(1) == np.asarray(y)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    out = {"conf": [], "acc": [], "count": [], "edges": np.linspace(0, 1, bins + 1).tolist()}
    for b in range(bins):
        sel = idx == b
        out["count"].append(int(sel.sum()))
        out["conf"].append(float(conf[sel].mean()) if sel.any() else float("nan"))
        out["acc"].append(float(correct[sel].mean()) if sel.any() else float("nan"))
    return out


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `score` for the boolean `positive` (rank statistic, ties averaged).
    NaN when only one class is present."""
    score = np.asarray(score, float)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):                      # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p = np.asarray(probs)[np.arange(len(y)), np.asarray(y)]
    return float(-np.log(np.clip(p, 1e-12, 1)).mean())


def bootstrap_recall(y, pred, groups, cls: int, n: int = 1000, level: float = 0.9, seed: int = 0) -> dict:
    """Recall of class `cls` with a `level` confidence interval from resampling whole groups (prompts):
    positions of one prompt are correlated, so resampling positions would understate the spread.
    Returns {"recall", "lo", "hi", "support", "groups"}; NaNs when the class is absent."""
    y, pred, groups = np.asarray(y), np.asarray(pred), np.asarray(groups)
    pos = y == cls
    ids, inv = np.unique(groups, return_inverse=True)
    tp = np.bincount(inv, weights=(pos & (pred == cls)).astype(float), minlength=len(ids))
    sup = np.bincount(inv, weights=pos.astype(float), minlength=len(ids))
    out = {"recall": float(tp.sum() / sup.sum()) if sup.sum() else float("nan"),
           "support": int(sup.sum()), "groups": int((sup > 0).sum()), "lo": float("nan"), "hi": float("nan")}
    if sup.sum() == 0:
        return out
    draw = np.random.default_rng(seed).integers(0, len(ids), size=(n, len(ids)))
    t, s = tp[draw].sum(1), sup[draw].sum(1)
    r = t[s > 0] / s[s > 0]
    out["lo"], out["hi"] = (float(v) for v in np.quantile(r, [(1 - level) / 2, (1 + level) / 2]))
    return out
