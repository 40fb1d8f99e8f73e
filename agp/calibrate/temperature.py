"""Temperature scaling: one scalar T per head, fitted on the valid split by NLL."""
from __future__ import annotations

import numpy as np

from agp.calibrate.metrics import nll


def softmax(logits: np.ndarray, T: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, float) / T
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(logits: np.ndarray, y: np.ndarray, lo: float = 0.05, hi: float = 20.0, steps: int = 200) -> float:
    """T minimising NLL on (logits, y): a log-spaced grid, then a local refinement (1-D, convex in
    practice, so a grid is exact enough and cannot diverge)."""
    grid = np.geomspace(lo, hi, steps)
    losses = [nll(softmax(logits, t), y) for t in grid]
    i = int(np.argmin(losses))
    fine = np.geomspace(grid[max(i - 1, 0)], grid[min(i + 1, steps - 1)], 41)
    return float(fine[int(np.argmin([nll(softmax(logits, t), y) for t in fine]))])
