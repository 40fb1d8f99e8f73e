"""Threshold sweep over the label parameters: class balance and label stability per setting."""
from __future__ import annotations

import itertools

import numpy as np

from agp.oracle.labels import ROUTES, VITALITY, LabelArgs, class_shares, route_labels

KL_ACCEPT_Q = (0.20, 0.35, 0.50)
MARGIN_Q = (0.10, 0.20, 0.30)
KL_DEAD_Q = (0.60, 0.75, 0.90)


def grid(kl_d: np.ndarray, teacher_margin: np.ndarray) -> dict[str, list[float]]:
    """Parameter values at quantiles of the statistic each one cuts (docs/labels.md)."""
    q = lambda x, qs: [round(float(v), 4) for v in np.quantile(x, qs)]  # noqa: E731
    return {"kl_accept": q(kl_d, KL_ACCEPT_Q), "margin_delta": q(teacher_margin, MARGIN_Q),
            "kl_dead": q(kl_d, KL_DEAD_Q)}


def sweep(kl, agree, teacher_margin, layers, decision, n_layers, min_stability: float = 0.8) -> dict:
    """Label every grid setting; report balance and stability; choose by the documented rule."""
    g = grid(kl[list(layers).index(decision)], teacher_margin)
    names = list(g)
    labels, rows = {}, []
    for combo in itertools.product(*(range(len(g[n])) for n in names)):
        a = LabelArgs(**{n: g[n][i] for n, i in zip(names, combo)})
        labels[combo] = route_labels(kl, agree, teacher_margin, layers, decision, n_layers, a)
    for combo, lab in labels.items():
        same = []
        for j in range(len(names)):
            for step in (-1, 1):
                nb = list(combo)
                nb[j] += step
                if 0 <= nb[j] < len(g[names[j]]):
                    same.append(float((labels[tuple(nb)]["route"] == lab["route"]).mean()))
        rs, vs = class_shares(lab["route"], ROUTES), class_shares(lab["vitality"], VITALITY)
        rows.append({"params": {n: g[n][i] for n, i in zip(names, combo)}, "route_shares": rs,
                     "vitality_shares": vs, "route_min_share": min(rs.values()),
                     "vitality_min_share": min(vs.values()), "stability": float(np.mean(same)) if same else 1.0})
    stable = [r for r in rows if r["stability"] >= min_stability]
    pool = stable or rows
    best = max(pool, key=lambda r: (r["route_min_share"], r["vitality_min_share"], r["stability"]))
    why = (f"largest smallest-route-class share ({best['route_min_share']:.3f}) among {len(stable)}/{len(rows)} "
           f"settings with label stability >= {min_stability}" if stable else
           f"no setting reached label stability {min_stability}; largest smallest-route-class share "
           f"({best['route_min_share']:.3f}) over all {len(rows)}")
    return {"grid": g, "rows": rows, "chosen": best["params"], "why": why, "chosen_row": best}
