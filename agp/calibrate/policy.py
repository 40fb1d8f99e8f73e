"""Turning calibrated head probabilities into actions: per-action thresholds, abstain, gate sweep.

Missing an `escalate` or a `revive_local` costs correctness, a false one only costs compute, so
those two get thresholds chosen for recall on the valid split; a false `accept_local` costs
correctness, so it gets a threshold chosen for precision. Low confidence abstains: the
controller's decision is not used and the token takes the safe default (full local depth).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agp.config import ConfigMixin
from agp.oracle.labels import ROUTES

ACC, CONT, REV, ESC = (ROUTES.index(a) for a in ("accept_local", "continue_local", "revive_local", "escalate"))
GRID = np.linspace(0.0, 1.0, 101)


@dataclass
class PolicyArgs(ConfigMixin):
    recall_target: float = 0.80      # escalate / revive_local thresholds: recall on valid at least this
    precision_target: float = 0.80   # accept_local threshold: precision on valid at least this
    min_acceptance: float = 0.70     # abstain gate: keep at least this share of decisions on valid


def decide(probs: np.ndarray, th: dict[str, float]) -> np.ndarray:
    """Actions [N] from route probabilities [N, 4] and per-action thresholds."""
    pred = probs.argmax(1)
    pred = np.where((pred == ACC) & (probs[:, ACC] < th["accept_local"]), CONT, pred)
    pred = np.where(probs[:, REV] >= th["revive_local"], REV, pred)
    return np.where(probs[:, ESC] >= th["escalate"], ESC, pred)


def fit_thresholds(probs: np.ndarray, y: np.ndarray, args: PolicyArgs) -> dict[str, float]:
    """Per-action thresholds on the valid split (rules in the module docstring)."""
    th = {}
    for a, name in ((ESC, "escalate"), (REV, "revive_local")):
        true = y == a
        # revive is overridden by escalate (decide's precedence), so its recall counts only positions
        # escalate leaves to it
        free = true & (probs[:, ESC] < th["escalate"]) if a == REV else true
        ok = [t for t in GRID if free.any() and ((probs[:, a] >= t) & free).sum() >= args.recall_target * free.sum()]
        th[name] = float(max(ok)) if ok else 0.0
    best, best_f1 = 1.0, -1.0
    for t in GRID[::-1]:
        sel = (probs.argmax(1) == ACC) & (probs[:, ACC] >= t)
        if not sel.any():
            continue
        prec = (y[sel] == ACC).mean()
        rec = sel[y == ACC].mean() if (y == ACC).any() else 0.0
        if prec >= args.precision_target:
            best = float(t)               # keep lowering while precision holds: more accepts
            best_f1 = 2.0
        elif best_f1 < 2.0:
            f1 = 2 * prec * rec / max(prec + rec, 1e-12)
            if f1 > best_f1:
                best, best_f1 = float(t), f1
    th["accept_local"] = best
    return th


def confidence(probs: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """The calibrated probability of the action taken."""
    return probs[np.arange(len(actions)), actions]


def gate_sweep(conf: np.ndarray, correct: np.ndarray) -> dict:
    """Acceptance rate and error among accepted decisions for every confidence gate in GRID."""
    acc, err = [], []
    for t in GRID:
        keep = conf >= t
        acc.append(float(keep.mean()))
        err.append(float(1 - correct[keep].mean()) if keep.any() else 0.0)
    return {"gate": GRID.tolist(), "acceptance": acc, "error": err}


def choose_gate(conf: np.ndarray, min_acceptance: float) -> float:
    """Largest confidence gate that keeps at least `min_acceptance` of the decisions."""
    ok = [t for t in GRID if (conf >= t).mean() >= min_acceptance]
    return float(max(ok)) if ok else 0.0


def recall_frontier(probs: np.ndarray, y: np.ndarray, grid=np.linspace(0.0, 1.0, 21)) -> dict:
    """What the deployed policy family can reach on (escalate recall, revive_local recall): every
    pair of the two thresholds on `grid`, kept when no other pair beats it on both recalls.
    `best_balanced` is the pair with the largest min(escalate recall, revive recall). Fitted on the
    split it is given, so on held-out it is an optimistic bound for `decide`, not a deployable point."""
    if not ((y == ESC).any() and (y == REV).any()):
        return {"points": [], "best_balanced": None}
    pts = []
    for te in grid:
        for tr in grid:
            a = decide(probs, {"accept_local": 1.0, "escalate": float(te), "revive_local": float(tr)})
            pts.append({"escalate_threshold": float(te), "revive_threshold": float(tr),
                        "escalate_recall": float((a[y == ESC] == ESC).mean()),
                        "revive_recall": float((a[y == REV] == REV).mean()),
                        "flagged": float(np.isin(a, [ESC, REV]).mean())})
    front = [p for p in pts if not any(q["escalate_recall"] >= p["escalate_recall"] and q["revive_recall"] >= p["revive_recall"]
                                       and (q["escalate_recall"], q["revive_recall"]) != (p["escalate_recall"], p["revive_recall"])
                                       for q in pts)]
    front = sorted({(p["escalate_recall"], p["revive_recall"]): p for p in front}.values(), key=lambda p: p["escalate_recall"])
    best = max(front, key=lambda p: (min(p["escalate_recall"], p["revive_recall"]), -p["flagged"]))
    return {"points": front, "best_balanced": best}
