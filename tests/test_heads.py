"""Controller heads (MLX) and the scalar baselines on synthetic, learnable data."""
from __future__ import annotations

import numpy as np
import pytest

from agp.calibrate.metrics import macro_f1
from agp.errors import AGPError
from agp.heads import baselines as B
from agp.heads.controller import Controller, HeadArgs, class_weights, train


CENTERS = np.random.default_rng(0).normal(size=(4, 24)) * 3


def _data(n, rng, k=4, d=24):
    centers = CENTERS
    y = rng.integers(0, k, n)
    x = centers[y] + rng.normal(size=(n, d))
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def trained():
    feats, labels = {}, {}
    for s, n in (("train", 400), ("valid", 120), ("heldout", 120)):
        x, y = _data(n, np.random.default_rng({"train": 1, "valid": 2, "heldout": 3}[s]))
        feats[s] = x * 100 + 7                       # badly scaled on purpose: standardisation must handle it
        labels[s] = {"route": y, "vitality": (y + 1) % 4, "earliest": y % 3}
    args = HeadArgs(steps=120, eval_every=20)
    ctl, info = train(feats, labels, {"route": 4, "vitality": 4, "earliest": 3}, args)
    return ctl, info, feats, labels


def test_heads_learn_a_separable_task(trained):
    ctl, info, feats, labels = trained
    lg = ctl.logits(feats["heldout"])
    assert set(lg) == {"route", "vitality", "earliest"}
    assert macro_f1(labels["heldout"]["route"], lg["route"].argmax(1), 4) > 0.9
    assert info["best_valid_route_macro_f1"] > 0.9 and info["history"]


def test_macs_count_and_save_load_roundtrip(trained, tmp_path):
    ctl, _, feats, _ = trained
    assert ctl.macs() == 24 * ctl.args.hidden + ctl.args.hidden * (4 + 4 + 3)
    ctl.save(tmp_path / "h")
    again = Controller.load(tmp_path / "h")
    a, b = ctl.logits(feats["valid"]), again.logits(feats["valid"])
    assert all(np.allclose(a[t], b[t], atol=1e-5) for t in a)


def test_bad_inputs_are_refused(trained, tmp_path):
    ctl, _, feats, labels = trained
    x = feats["valid"].copy()
    x[3, 5] = np.nan
    with pytest.raises(AGPError, match="non-finite"):
        ctl.logits(x)
    with pytest.raises(AGPError, match=r"\[N, 24\]"):
        ctl.logits(x[:, :10])
    with pytest.raises(AGPError, match="route"):
        train(feats, labels, {"vitality": 4}, HeadArgs(steps=2, tasks=["vitality"]))
    with pytest.raises(AGPError, match="heads.json"):
        Controller.load(tmp_path / "nothing")


def test_class_weights_balance_rare_classes():
    w = class_weights(np.array([0] * 90 + [1] * 10), 3)
    assert w[1] == pytest.approx(9 * w[0]) and w[2] == 0


def test_scalar_rule_recovers_ordered_intervals():
    rng = np.random.default_rng(4)
    s = rng.uniform(0, 4, 800)
    y = np.array([2, 0, 3, 1])[np.floor(s).astype(int)]          # class order along the score: 2, 0, 3, 1
    rule = B.ScalarRule(4).fit(s, y)
    assert macro_f1(y, rule.predict(s), 4) > 0.9          # cut points sit on sample quantiles
    p = rule.proba(s)
    assert np.allclose(p.sum(1), 1) and (p.argmax(1) == rule.predict(s)).mean() > 0.9


def test_majority_constant_and_saturation():
    p = B.majority_proba(np.array([1, 1, 2]), 5, 4)
    assert p.shape == (5, 4) and (p.argmax(1) == 1).all()
    assert (B.constant_proba(0, 3, 4)[:, 0] == 1).all()
    h = np.random.default_rng(0).normal(size=(6, 8))
    assert np.allclose(B.saturation(h, h), 1) and np.allclose(B.saturation(h, -h), -1)
