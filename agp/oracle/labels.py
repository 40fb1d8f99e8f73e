"""Earliest acceptable layer, vitality and route labels: the rules of docs/labels.md, exactly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agp.config import ConfigMixin
from agp.errors import AGPError

ROUTES = ("accept_local", "continue_local", "revive_local", "escalate")
VITALITY = ("alive", "weak", "dead", "revive_needed")


@dataclass
class LabelArgs(ConfigMixin):
    kl_accept: float = 0.5       # nats: acceptable = top-1 agrees and KL(teacher || probe) <= this
    margin_delta: float = 0.1    # teacher top-1 minus top-2 probability below this -> escalate
    kl_dead: float = 6.0         # nats: KL at the decision layer above this -> dead


def acceptable(kl: np.ndarray, agree: np.ndarray, args: LabelArgs) -> np.ndarray:
    """[L, P] bool: the probe at this layer gives the teacher's answer, close enough."""
    return np.asarray(agree, bool) & (np.asarray(kl) <= args.kl_accept)


def earliest_layer(ok: np.ndarray, layers: list[int], n_layers: int) -> np.ndarray:
    """[P] smallest probe layer from which every later probe layer is acceptable; n_layers if none.
    `ok` is [len(layers), P] over sorted intermediate layers (the final layer is acceptable by definition)."""
    layers = list(layers)
    if layers != sorted(layers) or (layers and layers[-1] >= n_layers):
        raise AGPError(f"probe layers must be sorted and below {n_layers}, got {layers}")
    out = np.full(ok.shape[1], n_layers, dtype=np.int64)
    stable = np.ones(ok.shape[1], bool)
    for i in range(len(layers) - 1, -1, -1):       # walk down from the top while it stays acceptable
        stable &= ok[i]
        out[stable] = layers[i]
    return out


def vitality_labels(kl: np.ndarray, agree: np.ndarray, layers: list[int], decision: int,
                    args: LabelArgs) -> np.ndarray:
    """[P] index into VITALITY for the state at the decision layer."""
    if decision not in layers:
        raise AGPError(f"decision layer {decision} is not a probe layer {list(layers)}; add it to --controller-layers")
    ok = acceptable(kl, agree, args)
    d = list(layers).index(decision)
    earlier = ok[:d].any(0) if d > 0 else np.zeros(ok.shape[1], bool)
    v = np.where(kl[d] <= args.kl_dead, VITALITY.index("weak"), VITALITY.index("dead"))
    v = np.where(ok[d], VITALITY.index("alive"), v)
    v = np.where(earlier & ~ok[d], VITALITY.index("revive_needed"), v)
    return v.astype(np.int64)


def route_labels(kl: np.ndarray, agree: np.ndarray, teacher_margin: np.ndarray, layers: list[int],
                 decision: int, n_layers: int, args: LabelArgs) -> dict[str, np.ndarray]:
    """Route [P] (index into ROUTES), vitality [P] and earliest acceptable layer [P]."""
    kl, agree = np.asarray(kl), np.asarray(agree, bool)
    if kl.shape != agree.shape or kl.shape[0] != len(layers) or kl.shape[1] != len(teacher_margin):
        raise AGPError(f"label inputs disagree in shape: kl {kl.shape}, agree {agree.shape}, "
                       f"{len(layers)} layers, {len(teacher_margin)} teacher margins")
    if not (np.isfinite(kl).all() and np.isfinite(teacher_margin).all()):
        raise AGPError("non-finite KL or teacher margin in the probe statistics; the hidden states are corrupt")
    e = earliest_layer(acceptable(kl, agree, args), layers, n_layers)
    vit = vitality_labels(kl, agree, layers, decision, args)
    r = np.full(len(e), ROUTES.index("continue_local"), dtype=np.int64)
    r[np.isin(vit, [VITALITY.index("dead"), VITALITY.index("revive_needed")])] = ROUTES.index("revive_local")
    r[e <= decision] = ROUTES.index("accept_local")
    r[np.asarray(teacher_margin) < args.margin_delta] = ROUTES.index("escalate")
    return {"route": r, "vitality": vit, "earliest": e}


def class_shares(y: np.ndarray, names) -> dict[str, float]:
    """Fraction of each class (all names listed, zeros included)."""
    y = np.asarray(y)
    n = max(len(y), 1)
    return {c: float((y == i).sum() / n) for i, c in enumerate(names)}


def require_all_classes(y: np.ndarray, names, what: str) -> None:
    """A head trained without a class is silently degenerate: refuse it, naming the class."""
    missing = [c for i, c in enumerate(names) if not (np.asarray(y) == i).any()]
    if missing:
        raise AGPError(f"{what} has no examples of class {', '.join(missing)}; add prompts "
                       f"(--controller-prompts) or change the label parameters (docs/labels.md)")
