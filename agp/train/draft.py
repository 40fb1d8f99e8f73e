"""The runtime stage's draft choice: the feature draft head's training, and the measured chains
both drafts are chosen from.

A speculative round's worth depends on runs of accepted drafts, not on single positions, so the
cost model reads chains measured on the valid prompts: from every start position, the draft's
confidence and correctness at depth 1..K, with the true tokens fed in (a round only goes on while
its drafts are right). The exit head's chains come from its per-position outputs (its layer-E
state of a correct draft is exact); the feature head's from feeding its own predicted states back
(agp.heads.draft.chain). For each confidence gate tau and most drafts k, one round then yields
1 + E[accepted drafts] tokens for 1 + draft_cost * E[proposed drafts] plain steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from agp.heads.exit import shortlist_top1

# Verifying one more position costs ~0.15 of a plain step on these machines (DESIGN.md: one
# forward of 1 token 98 ms, of 5 tokens 157 ms), on top of the draft's own weight reads.
VERIFY_POSITION_COST = 0.15


def chain_table(conf: np.ndarray, ok: np.ndarray, draft_cost: float, taus, k_max: int, **label) -> list[dict]:
    """Expected tokens per round, cost and speedup for each gate tau and k <= k_max, from chains
    conf/ok [S, K] (depth 1..K from each start)."""
    rows = []
    for tau in taus:
        prop = np.cumprod(conf >= tau, axis=1)
        acc = np.cumprod((conf >= tau) & ok, axis=1)
        for k in range(1, min(k_max, conf.shape[1]) + 1):
            tokens = 1 + acc[:, :k].sum(1).mean()
            cost = 1 + draft_cost * prop[:, :k].sum(1).mean()
            rows.append({**label, "tau": float(tau), "k": k, "draft_cost": draft_cost,
                         "proposed_per_round": float(prop[:, :k].sum(1).mean()),
                         "acceptance": float(acc[:, :k].sum() / max(prop[:, :k].sum(), 1)),
                         "tokens_per_round": float(tokens), "expected_speedup": float(tokens / cost)})
    return rows


def shift_chains(conf: np.ndarray, ok: np.ndarray, runs, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-position outputs -> chains [S, depth]: depth d from row r is row r + d of the same run."""
    n = len(conf)
    C, O = np.zeros((n, depth), np.float32), np.zeros((n, depth), bool)
    for a, m in runs:
        for d in range(min(depth, m)):
            C[a:a + m - d, d] = conf[a + d:a + m]
            O[a:a + m - d, d] = ok[a + d:a + m]
    return C, O


def exit_chains(head, h_e: np.ndarray, top1: np.ndarray, runs, depth: int, batch: int = 512):
    """The exit head's chains on valid positions (states after E blocks, `runs` of consecutive rows)."""
    conf, tok = shortlist_top1(head, h_e, batch)
    return shift_chains(conf, tok == top1, runs, depth)


@dataclass
class FeatureFit:
    head: object                     # FeatureDraftHead
    row: dict                        # valid metrics, acceptance per depth, cost per draft
    conf: np.ndarray                 # valid chains [S, K]
    ok: np.ndarray


def fit_feature_draft(bb, finals: np.ndarray, tokens: list, positions: list, valid, ids, cfg, bar=None) -> FeatureFit:
    """Train the feature draft head on consecutive final states (train prompts), measure it on the
    valid prompts: one-step top-1 agreement / KL / coverage, and chains to depth cfg.draft_max."""
    from agp.heads.draft import FeatureDraftHead, chain, feature_pairs
    from agp.heads.exit import ExitHeadArgs, distill, evaluate, full_top1
    L = bb.n_layers
    tr = feature_pairs(bb, finals, tokens, positions)
    va = feature_pairs(bb, valid.hidden[L], valid.tokens, valid.positions)
    head = FeatureDraftHead(bb, ids, inner=cfg.draft_inner)
    args = ExitHeadArgs(vocab=len(ids), steps=cfg.draft_steps, batch=256, lr=cfg.draft_lr, seed=cfg.seed)
    hist = distill(head, tr.x, tr.y, args, progress=bar)
    top1 = full_top1(bb, va.y)
    conf, ok = chain(head, va, top1, cfg.draft_max)
    f1, t1 = mx.array(va.x[:1, None, :bb.hidden_size]), int(tokens[0][1])
    ms = time_ms(lambda: head.step(f1, t1)[1])
    starts = conf.shape[0]
    row = {"kind": "feature", "vocab": len(ids), "train_pairs": int(len(tr.x)), "valid_pairs": int(len(va.x)),
           "train": hist, "valid": evaluate(head, va.x, va.y, top1),
           "chain_top1_by_depth": [float(ok[:, d].sum() / max((conf[:, d] > 0).sum(), 1)) for d in range(ok.shape[1])],
           "draft_ms": ms, "draft_macs": head.macs(), "starts": starts}
    return FeatureFit(head, row, conf, ok)


def time_ms(fn, repeat: int = 8) -> float:
    """Best-of-`repeat` wall time of fn() in ms (forcing evaluation)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t)
    return best * 1e3
