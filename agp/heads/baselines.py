"""Baselines on the same route labels: majority class, entropy-only thresholding, CALM-style
softmax-confidence (top-1 minus top-2 probability of the probe) and hidden-state saturation
(cosine of consecutive layers' hidden states), and a fixed-layer split.

Every scalar baseline uses the same rule: order the classes by their mean score on the train
split and cut the score into intervals, one class each, with cut points (at train quantiles)
chosen for train macro-F1; its probabilities are the class frequencies within each interval on
train (Laplace-smoothed), so it has a confidence to calibrate like the controller.
"""
from __future__ import annotations

import itertools

import numpy as np

from agp.calibrate.metrics import macro_f1


class ScalarRule:
    """Cut one score into class intervals (see module docstring)."""

    def __init__(self, k: int, n_quantiles: int = 19):
        self.k, self.nq = k, n_quantiles

    def fit(self, s: np.ndarray, y: np.ndarray) -> "ScalarRule":
        s, y = np.asarray(s, float), np.asarray(y, int)
        means = [s[y == c].mean() if (y == c).any() else np.inf for c in range(self.k)]
        self.order = np.argsort(means)                        # class of each interval, low score first
        qs = np.unique(np.quantile(s, np.linspace(0, 1, self.nq + 2)[1:-1]))
        best, best_f1 = None, -1.0
        for cuts in itertools.combinations_with_replacement(qs, self.k - 1):
            f1 = macro_f1(y, self.order[np.searchsorted(cuts, s, side="right")], self.k)
            if f1 > best_f1:
                best, best_f1 = np.asarray(cuts), f1
        self.cuts = best
        bins = np.searchsorted(self.cuts, s, side="right")
        self.table = np.ones((self.k, self.k))                 # interval -> class counts (+1 smoothing)
        np.add.at(self.table, (bins, y), 1)
        self.table /= self.table.sum(1, keepdims=True)
        return self

    def predict(self, s) -> np.ndarray:
        return self.order[np.searchsorted(self.cuts, np.asarray(s, float), side="right")]

    def proba(self, s) -> np.ndarray:
        return self.table[np.searchsorted(self.cuts, np.asarray(s, float), side="right")]


def majority_proba(y_train: np.ndarray, n: int, k: int) -> np.ndarray:
    """Every decision = the train majority class, with the train class frequencies as probabilities."""
    freq = np.bincount(y_train, minlength=k).astype(float) + 1
    freq /= freq.sum()
    return np.tile(freq, (n, 1))


def constant_proba(cls: int, n: int, k: int) -> np.ndarray:
    """A fixed rule that is always sure of one class (fixed-layer split: always exit at D)."""
    p = np.zeros((n, k))
    p[:, cls] = 1.0
    return p


def saturation(h_a: np.ndarray, h_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of two layers' hidden states per position (CALM's state saturation)."""
    num = (h_a * h_b).sum(1)
    return num / (np.linalg.norm(h_a, axis=1) * np.linalg.norm(h_b, axis=1) + 1e-12)
