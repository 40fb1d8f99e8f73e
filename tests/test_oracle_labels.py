"""Oracle label rules (docs/labels.md) on hand-made profiles, the sweep, and the probes against lens_stats."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agp.errors import AGPError
from agp.oracle import labels as L
from agp.oracle.probes import Translator, fit_translator, hidden_at, probe_stats
from agp.oracle.sweep import sweep

LAYERS = [2, 4, 6, 8]          # n_layers = 10, decision layer 6
A = L.LabelArgs(kl_accept=0.5, margin_delta=0.1, kl_dead=5.0)


def _col(kl, agree):
    return np.array(kl, float)[:, None], np.array(agree, bool)[:, None]


def _route(kl, agree, tm=0.5):
    k, a = _col(kl, agree)
    out = L.route_labels(k, a, np.array([tm]), LAYERS, 6, 10, A)
    return L.ROUTES[out["route"][0]], L.VITALITY[out["vitality"][0]], int(out["earliest"][0])


def test_each_route_and_vitality_rule():
    assert _route([9, 3, 0.1, 0.1], [0, 0, 1, 1]) == ("accept_local", "alive", 6)
    assert _route([9, 3, 0.1, 0.1], [0, 0, 1, 1], tm=0.05) == ("escalate", "alive", 6)     # escalate first
    assert _route([9, 3, 2.0, 0.1], [0, 0, 0, 1]) == ("continue_local", "weak", 8)
    assert _route([9, 8, 7.0, 0.1], [0, 0, 0, 1]) == ("revive_local", "dead", 8)
    assert _route([0.1, 3, 2.0, 0.1], [1, 0, 0, 1]) == ("revive_local", "revive_needed", 8)  # formed, then lost
    assert _route([9, 3, 0.1, 3.0], [0, 0, 1, 0]) == ("continue_local", "alive", 10)         # not stable: no accept
    assert _route([9, 3, 0.1, 0.1], [0, 0, 0, 1])[2] == 8                                     # agreement required too


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.booleans()), min_size=4, max_size=4), st.floats(0.05, 3))
def test_earliest_layer_properties(prof, tau):
    kl = np.array([p[0] for p in prof])[:, None]
    ag = np.array([p[1] for p in prof])[:, None]
    a = L.LabelArgs(kl_accept=tau)
    ok = L.acceptable(kl, ag, a)
    e = L.earliest_layer(ok, LAYERS, 10)[0]
    assert e in LAYERS + [10]
    assert all(ok[i, 0] for i, l in enumerate(LAYERS) if l >= e)            # acceptable from e* on
    if e > LAYERS[0]:                                                         # and not one layer earlier
        prev = max(l for l in LAYERS if l < e)
        assert not ok[LAYERS.index(prev), 0]
    looser = L.earliest_layer(L.acceptable(kl, ag, L.LabelArgs(kl_accept=tau * 2)), LAYERS, 10)[0]
    assert looser <= e                                                        # a looser rule never exits later


def test_missing_class_and_bad_shapes_are_errors():
    with pytest.raises(AGPError, match="revive_local"):
        L.require_all_classes(np.array([0, 1, 3]), L.ROUTES, "train route labels")
    with pytest.raises(AGPError, match="shape"):
        L.route_labels(np.zeros((3, 2)), np.zeros((4, 2), bool), np.zeros(2), LAYERS, 6, 10, A)
    with pytest.raises(AGPError, match="non-finite"):
        L.route_labels(np.full((4, 1), np.nan), np.zeros((4, 1), bool), np.ones(1), LAYERS, 6, 10, A)
    with pytest.raises(AGPError, match="decision layer"):
        L.vitality_labels(np.zeros((4, 1)), np.zeros((4, 1), bool), LAYERS, 5, A)


def test_sweep_reports_balance_stability_and_choice():
    rng = np.random.default_rng(0)
    P = 400
    depth = rng.integers(0, 5, P)                           # layer index from which the answer is formed
    kl = np.stack([np.where(i >= depth, rng.uniform(0, 1, P), rng.uniform(2, 9, P)) for i in range(4)])
    agree = kl < 1.5
    s = sweep(kl, agree, rng.uniform(0, 1, P), LAYERS, 6, 10)
    assert len(s["rows"]) == 27 and set(s["chosen"]) == {"kl_accept", "margin_delta", "kl_dead"}
    best = s["chosen_row"]
    assert all(0 <= r["stability"] <= 1 for r in s["rows"])
    assert abs(sum(best["route_shares"].values()) - 1) < 1e-9
    pool = [r for r in s["rows"] if r["stability"] >= 0.8] or s["rows"]
    assert best["route_min_share"] == max(r["route_min_share"] for r in pool)


def test_fit_translator_recovers_an_affine_map():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 8)).astype(np.float32) * np.array([1, 50, 1, 1, 1, 1, 1, 0.1], np.float32)
    W = rng.normal(size=(8, 8)).astype(np.float32)
    Y = X @ W + 3.0
    t = fit_translator(X, Y, ridge=1e-6)
    assert np.abs(t(X) - Y).max() < 1e-2
    assert np.allclose(np.asarray(t(mx.array(X))), t(X), atol=1e-4)
    assert Translator()(X) is X


@pytest.fixture(scope="module")
def bb(tiny_model_dir):
    from agp.backbone import load
    return load(tiny_model_dir["gemma3_text"])


def test_probe_stats_match_lens_stats(bb):
    from agp.backbone.lens import lens_stats
    ids = bb.encode("def f(x):\n    return x + 1\n")
    layers = [1, 2, 3, 4, 5]
    logits, hid = bb.capture(mx.array([ids]), layers + [bb.n_layers])
    ref = lens_stats(bb, {l: hid[l] for l in layers}, logits, layers)
    pos = list(range(len(ids)))
    h = hidden_at(bb, ids, layers + [bb.n_layers], pos)
    got = probe_stats(bb, h, h[bb.n_layers], layers)
    assert np.allclose(got["kl"], ref["kl"], atol=1e-4)
    assert (got["agree"] == ref["agree"]).all()
    assert np.allclose(got["margin"], ref["margin"], atol=1e-5)
    assert np.allclose(got["teacher_entropy"], ref["teacher_entropy"], atol=1e-4)
    assert (got["entropy"] >= -1e-5).all() and ((got["p1"] > 0) & (got["p1"] <= 1 + 1e-6)).all()


@pytest.mark.parametrize("full_layers", [None, [3]])
def test_fast_probe_path_equals_reference(bb, full_layers):
    """The fast path (in-place logits, pipelined matmuls) computes the same statistics as the
    reference path, with and without translators, for full and KL-only layers."""
    ids = bb.encode("import os\nprint(os.getcwd())  # where am I\n")
    layers = [1, 2, 3, 4, 5]
    h = hidden_at(bb, ids, layers + [bb.n_layers], list(range(len(ids))))
    rng = np.random.default_rng(0)
    trans = {3: Translator(np.eye(h[3].shape[1], dtype=np.float32) + 0.01 * rng.standard_normal(
        (h[3].shape[1],) * 2).astype(np.float32), np.zeros(h[3].shape[1], np.float32))}
    for translators in (None, trans):
        kw = dict(translators=translators, full_layers=full_layers, group=2)
        ref = probe_stats(bb, h, h[bb.n_layers], layers, method="reference", **kw)
        got = probe_stats(bb, h, h[bb.n_layers], layers, method="fast", **kw)
        assert set(got) == set(ref)
        for key in ref:
            assert np.allclose(got[key], ref[key], atol=1e-5, equal_nan=True), key


def test_unknown_probe_method_is_one_line(bb):
    h = {1: np.zeros((2, bb.hidden_size), np.float32)}
    with pytest.raises(AGPError, match="unknown probe method"):
        probe_stats(bb, h, h[1], [1], method="quick")


def test_nan_hidden_states_are_refused(tiny_model_dir, tmp_path):
    import shutil
    from agp.backbone import load
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir["gemma3_text"], d)
    bad = load(str(d))
    w = bad.model.model.layers[1].mlp.down_proj.weight
    bad.model.model.layers[1].mlp.down_proj.weight = mx.full(w.shape, float("nan"))
    with pytest.raises(AGPError, match="non-finite hidden states at layer 2"):
        hidden_at(bad, bad.encode("hello world"), [1, 2, 3], [1, 2])
