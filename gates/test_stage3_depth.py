"""Stage 3 gate: the depth-routing module is the plain residual path at initialisation (bit for bit),
beats the tuned lens and the plain residual path at every candidate block on held-out positions,
and its revive operation costs less than the remaining layers. Reads a run; never trains."""
from __future__ import annotations

import numpy as np
import pytest

from gates import thresholds as T
from gates.conftest import stage_record

pytestmark = pytest.mark.stage3


@pytest.fixture(scope="module")
def rec(agp_run):
    return stage_record(agp_run, "depth")


@pytest.fixture(scope="module")
def table(rec):
    return {(r["layer"], r["variant"]): r for r in rec["metrics"]["ablation"]}


def test_identity_at_initialisation_equals_the_plain_path(agp_run, rec):
    """A fresh module over the saved held-out states returns h_l exactly (re-measured here)."""
    from agp.heads.depth import DepthModule, routed_states
    z = np.load(agp_run.path / "depth" / "identity_sample.npz")
    states = {int(k[1:]): z[k] for k in z.files}
    for layer in rec["metrics"]["layers"]:
        m = DepthModule.identity(layer, list(range(0, layer + 1)), states, rank=8)
        assert np.array_equal(routed_states(m, states), states[layer]), f"block {layer}: not the identity"
    assert all(rec["metrics"]["identity_exact"].values())


def test_module_beats_tuned_lens_and_plain_residual(rec, table):
    for layer in rec["metrics"]["layers"]:
        mine = table[layer, "module + translator"]["kl"]
        assert mine <= T.STAGE3_KL_RATIO_VS_TUNED_MAX * table[layer, "tuned lens"]["kl"], \
            f"block {layer}: KL {mine:.3f} vs tuned lens {table[layer, 'tuned lens']['kl']:.3f}"
        assert mine < T.STAGE3_KL_RATIO_VS_PLAIN_MAX * table[layer, "plain residual"]["kl"], f"block {layer}"
        assert table[layer, "module + translator"]["top1"] >= table[layer, "tuned lens"]["top1"] - T.STAGE3_TOP1_SLACK


@pytest.mark.xfail(strict=False, reason="goal not reached at CI size: see gates/thresholds.py STAGE3_KL_GOAL_RATIO")
def test_goal_thirty_percent_lower_kl_than_tuned_lens_at_d(rec, table):
    d = rec["metrics"]["decision_layer"]
    assert table[d, "module + translator"]["kl"] <= T.STAGE3_KL_GOAL_RATIO * table[d, "tuned lens"]["kl"]


def test_revive_costs_less_than_the_remaining_layers(rec):
    rows = rec["metrics"]["revive"]["rows"]
    assert rows
    for r in rows:
        assert r["macs"] < r["remaining_macs"], f"revive at {r['layer']} costs {r['macs']} >= {r['remaining_macs']}"


def test_revive_makes_some_unacceptable_positions_acceptable(rec):
    rv = rec["metrics"]["revive"]
    chosen = next(r for r in rv["rows"] if r["layer"] == rv["chosen_layer"])
    assert chosen["rescued_share"] is not None and chosen["rescued_share"] >= T.STAGE3_REVIVE_RESCUE_MIN


@pytest.mark.xfail(strict=False, reason="goal not reached at CI size: see gates/thresholds.py STAGE3_REVIVE_GOAL")
def test_goal_revive_rescues_a_third(rec):
    rv = rec["metrics"]["revive"]
    chosen = next(r for r in rv["rows"] if r["layer"] == rv["chosen_layer"])
    assert chosen["rescued_share"] >= T.STAGE3_REVIVE_GOAL


def test_report_and_plots_exist(agp_run, rec):
    d = agp_run.path / "depth"
    assert "Revive" in (d / "report.md").read_text()
    for layer in rec["metrics"]["layers"]:
        assert (d / f"ablation_L{layer}.png").stat().st_size > 0
