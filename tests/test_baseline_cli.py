"""Stage 0 end to end through the CLI on a tiny model: artifacts, manifest, report, split rule."""
from __future__ import annotations

import json

import numpy as np

from agp.cli import main
from agp.backbone.lens import probe_positions
from agp.train.baseline import BaselineArgs, split_layer_map


def test_agp_run_stage_baseline_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    rc = main(["run", "--stage", "baseline", "--runs", str(tmp_path), "--model", tiny_model_dir["gemma3_text"],
               "--no-gates", "--baseline-prompts", "2", "--baseline-decode-tokens", "3"])
    assert rc == 0
    run_dir = (tmp_path / "latest").resolve()
    man = json.loads((run_dir / "manifest.json").read_text())
    rec = man["stages"]["baseline"]
    assert rec["status"] == "done" and rec["gate"]["outcome"] == "not run"
    m = rec["metrics"]
    assert m["parity"]["prefill_max_abs_diff"] <= 1e-4 and m["parity"]["decode_max_abs_diff"] <= 1e-4
    assert m["dataset"]["prompts"] == 6 and m["latency"]["decode_s"]["n"] == 6 * 3
    assert len(m["per_layer"]["kl_mean"]) == 6 and m["per_layer"]["kl_mean"][-1] < 1e-4
    assert (run_dir / "baseline" / "sufficiency.png").stat().st_size > 1000
    report = (run_dir / "report.md").read_text()
    assert "Stage 0" in report and "sufficiency.png" in report
    assert man["reproduce"].startswith("agp run --stage baseline")


def test_run_without_stage_then_unknown_model_fails_cleanly(tmp_path, capsys):
    rc = main(["run", "--stage", "baseline", "--runs", str(tmp_path), "--model", str(tmp_path / "missing"), "--no-gates"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_split_rule_on_a_known_profile():
    layers = list(range(1, 9))
    agree = np.array([0.0, 0.01, 0.05, 0.2, 0.4, 0.65, 0.8, 1.0])
    kl = np.array([12, 10, 8, 4, 2, 0.9, 0.4, 0.0])
    smap = split_layer_map(agree, kl, layers, 8, BaselineArgs())
    assert smap["onset_layer"] == 4 and smap["exit_layers"] == [6, 7]
    assert smap["candidates"] == [4, 6, 7]


def test_probe_positions_skip_bos_and_keep_last():
    assert probe_positions(5, 24) == [1, 2, 3, 4]
    pos = probe_positions(200, 24)
    assert len(pos) == 24 and pos[0] == 1 and pos[-1] == 199
    assert probe_positions(1, 4) == [0]


def test_gate_runs_after_the_stage_and_its_outcome_is_recorded(tiny_model_dir, tmp_path):
    """A random tiny model cannot pass the stage-0 depth-profile gate: the run must stop (rc 1)
    and the manifest must say the gate failed, with the command that reproduces it."""
    rc = main(["run", "--stage", "baseline", "--runs", str(tmp_path), "--model", tiny_model_dir["gemma3_text"],
               "--baseline-prompts", "1", "--baseline-decode-tokens", "2"])
    man = json.loads(((tmp_path / "latest").resolve() / "manifest.json").read_text())
    gate = man["stages"]["baseline"]["gate"]
    assert gate["outcome"] in ("passed", "failed") and "-m stage0" in gate["command"]
    assert rc == (0 if gate["outcome"] == "passed" else 1)
    assert gate["outcome"] == "failed", f"a random model passed the stage-0 gate: {gate['summary']}"
