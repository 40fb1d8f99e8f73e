"""`agp run --stage serve` on a tiny model through the CLI: the layouts table, its parity with full
depth, the reliability figures, the report and its plot."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_tiny_stages


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs-serve")
    return run_tiny_stages(root, tiny_model_dir["gemma3_text"], ["baseline", "controller", "runtime", "serve"])


def test_serve_stage_measures_every_layout_and_they_equal_full(served):
    m = json.loads((served.path / "serve" / "serve.json").read_text())
    layouts = {(r["layout"], r["rtt_ms"]) for r in m["layouts"]["rows"]}
    assert {("naive split", 0.0), ("naive split", 2.0), ("two-host speculative", 0.0),
            ("two-host speculative", 2.0)} <= layouts
    lossless = [r for r in m["layouts"]["rows"] if r["layout"] in ("naive split", "two-host speculative")]
    assert lossless and all(r["equal_full"] for r in lossless)
    assert all(r["equal_single_host"] for r in m["layouts"]["rows"] if r["layout"] == "two-host routed")
    assert m["ring"]["equal_full"] and m["ring"]["tok_s"] > 0
    slow = next(r for r in m["layouts"]["rows"] if r["layout"] == "naive split" and r["rtt_ms"] == 2.0)
    assert slow["link"]["rtt_ms_p50"] >= 2.0          # the relay's round trip is in the link's own figures
    rel = m["reliability"]
    assert rel["concurrency"]["lost"] == 0 and rel["restart"]["equal_full"]
    assert all(b["reason"] == b["expected"] for b in rel["bad_frames"].values())
    assert (served.path / "serve" / "tok_s_vs_rtt.png").stat().st_size > 0
    assert "Stage serve" in (served.path / "report.md").read_text()
