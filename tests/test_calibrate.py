"""Metrics, ECE, temperature scaling and the action policy (pure numpy)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agp.calibrate import metrics as M
from agp.calibrate import policy as P
from agp.calibrate.temperature import fit_temperature, softmax
from agp.errors import AGPError


def test_per_class_on_a_known_confusion():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 2, 2])
    r = M.per_class(y, p, ["a", "b", "c"])
    assert r["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["classes"]["a"]["recall"] == pytest.approx(2 / 3) and r["classes"]["a"]["precision"] == 1.0
    assert r["classes"]["b"]["f1"] == pytest.approx(0.5) and r["accuracy"] == pytest.approx(4 / 6)
    assert r["macro_f1"] == pytest.approx(np.mean([0.8, 0.5, 2 / 3]))


def test_ece_exact_small_case_and_bad_input():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])                 # bin 0.9: acc 0.5, bin 0.6: acc 1.0
    assert M.ece(probs, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    with pytest.raises(AGPError, match="finite"):
        M.ece(np.full((2, 2), np.nan), np.array([0, 1]))


def test_temperature_undoes_overconfidence():
    rng = np.random.default_rng(0)
    n, k = 4000, 4
    logits = rng.normal(size=(n, k)) * 2
    y = np.array([rng.choice(k, p=p) for p in softmax(logits)])      # calibrated at T = 1
    T = fit_temperature(logits * 3, y)
    assert T == pytest.approx(3, rel=0.15)
    assert M.ece(softmax(logits * 3, T), y) < M.ece(softmax(logits * 3), y)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40))
def test_auroc_matches_pairwise_definition(pairs):
    s = np.array([p[0] for p in pairs], float)
    pos = np.array([p[1] for p in pairs])
    got = M.auroc(s, pos)
    if pos.all() or not pos.any():
        assert np.isnan(got)
        return
    a, b = s[pos], s[~pos]
    want = ((a[:, None] > b[None]).sum() + 0.5 * (a[:, None] == b[None]).sum()) / (len(a) * len(b))
    assert got == pytest.approx(want)


def test_decide_precedence_and_thresholds():
    th = {"escalate": 0.3, "revive_local": 0.3, "accept_local": 0.6}
    probs = np.array([[0.5, 0.1, 0.1, 0.3],    # escalate wins over the argmax
                      [0.5, 0.2, 0.3, 0.0],    # revive wins
                      [0.5, 0.4, 0.1, 0.0],    # accept below its threshold -> continue
                      [0.7, 0.2, 0.1, 0.0]])   # confident accept
    assert P.decide(probs, th).tolist() == [P.ESC, P.REV, P.CONT, P.ACC]


def test_fit_thresholds_reaches_recall_on_valid_and_gate():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 2000)
    logits = np.eye(4)[y] * 1.5 + rng.normal(size=(2000, 4))
    probs = softmax(logits)
    args = P.PolicyArgs()
    th = P.fit_thresholds(probs, y, args)
    act = P.decide(probs, th)
    assert (act[y == P.ESC] == P.ESC).mean() >= args.recall_target - 1e-9
    free = (y == P.REV) & (act != P.ESC)              # revive positions escalate did not take first
    assert (act[free] == P.REV).mean() >= args.recall_target - 1e-9
    conf = P.confidence(probs, act)
    g = P.choose_gate(conf, 0.7)
    assert (conf >= g).mean() >= 0.7
    sw = P.gate_sweep(conf, act == y)
    assert all(a >= b for a, b in zip(sw["acceptance"], sw["acceptance"][1:]))


def test_bootstrap_recall_resamples_prompts():
    y = np.array([1, 1, 1, 1, 0, 1, 1, 0])
    pred = np.array([1, 1, 0, 0, 0, 1, 1, 1])
    g = np.array(["a", "a", "b", "b", "b", "c", "c", "c"])
    r = M.bootstrap_recall(y, pred, g, 1, n=500)
    assert r["recall"] == pytest.approx(4 / 6) and r["support"] == 6 and r["groups"] == 3
    assert 0.0 <= r["lo"] <= r["recall"] <= r["hi"] <= 1.0 and r["lo"] < r["hi"]
    one = M.bootstrap_recall(y, y, g, 1)                  # perfect recall has no spread
    assert one["lo"] == one["hi"] == 1.0
    assert np.isnan(M.bootstrap_recall(y, pred, g, 2)["recall"])


def test_recall_frontier_separable_vs_confused():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 800)
    sep = P.recall_frontier(softmax(np.eye(4)[y] * 6.0), y)        # the two classes told apart: both reach 1
    b = sep["best_balanced"]
    assert b["escalate_recall"] == 1.0 and b["revive_recall"] == 1.0
    same = np.tile([0.1, 0.1, 0.4, 0.4], (len(y), 1))               # identical scores: one class or the other
    conf = P.recall_frontier(same, y)
    assert min(conf["best_balanced"]["escalate_recall"], conf["best_balanced"]["revive_recall"]) == 0.0
    pts = [(p["escalate_recall"], p["revive_recall"]) for p in conf["points"]]
    assert (1.0, 0.0) in pts and (0.0, 1.0) in pts                # both corners, nothing dominated
    assert all(not (a >= c and b_ >= d and (a, b_) != (c, d)) for a, b_ in pts for c, d in pts)
    assert P.recall_frontier(same, np.zeros(len(y), int))["best_balanced"] is None
