"""Stage 5 gate (runtime part): speculative decoding is lossless on every benchmarked prompt
(one past the 512-token sliding window), `full` equals mlx-lm, and speculation reads fewer
weights per emitted token than full depth. Reads a run; never trains."""
from __future__ import annotations

import json

import pytest

from gates import thresholds as T
from gates.conftest import stage_record

pytestmark = pytest.mark.stage5


@pytest.fixture(scope="module")
def rec(agp_run):
    return stage_record(agp_run, "runtime")


@pytest.fixture(scope="module")
def table(rec):
    return {r["mode"]: r for r in rec["metrics"]["bench"]["table"]}


@pytest.fixture(scope="module")
def runs(agp_run):
    return json.loads((agp_run.path / "runtime" / "bench.json").read_text())["runs"]


def test_speculative_is_lossless_on_every_prompt_including_one_past_the_window(runs):
    """Every draft benchmarked (`speculative` = the run's choice, `speculative:exit`/`:feature`)."""
    spec = [r for r in runs if r["mode"].split(":")[0] == "speculative"]
    assert spec, "no speculative runs in the benchmark"
    for mode in {r["mode"] for r in spec}:
        assert max(r["prompt_tokens"] for r in spec if r["mode"] == mode) > T.STAGE5_LONG_PROMPT_MIN_TOKENS, mode
    for r in spec:
        assert r["vs_full"]["identical"], (f"{r['mode']} on {r['prompt']}: diverged from full at "
                                           f"{r['vs_full']['first_divergence']}")
        assert len(r["tokens"]) > 0


def test_full_equals_mlx_lm_generate(runs):
    for r in (r for r in runs if r["mode"] == "full"):
        assert r["vs_anchor"]["identical"], f"{r['prompt']}: full diverged from mlx_lm.generate"


def test_speculative_drafts_and_accepts(table):
    s = table["speculative"]
    assert s["acceptance"] is not None and s["acceptance"] >= T.STAGE5_SPEC_ACCEPTANCE_MIN
    assert s["tokens_per_round"] > 1.0


def test_speculative_reads_fewer_weights_per_token_than_full_depth(table):
    """Weight reads (parameters streamed per pass) are deterministic given the accepted drafts."""
    assert table["speculative"]["read_ratio_vs_full"] < T.STAGE5_SPEC_READ_RATIO_MAX


def test_speculative_macs_are_recorded_honestly(table):
    """Lossless greedy speculation computes full depth at every emitted position plus the drafts,
    so its MACs per token cannot be below full depth's: assert the accounting says so."""
    assert table["speculative"]["mac_ratio_vs_full"] >= 1.0


def test_exit_modes_save_macs(table):
    for mode, r in table.items():
        if mode.startswith("exit:"):
            assert r["mac_ratio_vs_full"] < 1.0, mode


def test_report_and_frontier_exist(agp_run):
    d = agp_run.path / "runtime"
    assert (d / "report.md").exists() and (d / "frontier.png").exists()
    assert "speculative" in (d / "report.md").read_text()


def _cheapest_at(points, method, target):
    macs = [p["mac_ratio"] for p in points if p["method"] == method and p["top1"] >= target]
    return min(macs) if macs else None


@pytest.mark.xfail(strict=False, reason="H2 not shown on the reference run: teacher-forced top-1 0.958 for routed "
                   "at its calibrated gate costs 0.852 of full depth's MACs; entropy reaches 0.965 at 0.744 "
                   "(gates/thresholds.py STAGE5_AGREEMENT_TARGETS)")
@pytest.mark.parametrize("target", T.STAGE5_AGREEMENT_TARGETS)
def test_routed_dominates_entropy_and_fixed_exits(rec, target):
    """On the teacher-forced frontier (held-out positions, every sweep): at each agreement target
    routed reaches it with fewer MACs than entropy and every exit:L."""
    pts = rec["metrics"]["teacher_forced"]["points"]
    mine = _cheapest_at(pts, "routed", target)
    assert mine is not None, f"routed never reaches top-1 {target}"
    for method in ("entropy", "exit:L"):
        other = _cheapest_at(pts, method, target)
        assert other is None or mine < other, f"{method} reaches {target} at {other:.3f} MACs, routed at {mine:.3f}"
