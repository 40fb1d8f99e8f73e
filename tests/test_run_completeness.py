"""Runs are complete or refused, never half-reused (README "Runs are complete or refused").

End to end through `agp run` on a tiny model: a run holding only stage 0 is completed, a stage
recorded as failed or interrupted is re-run, a run started by other code is not completed, and
`--stage X` first runs what X needs. The gate sessions (gates/conftest.py) apply the same rule by
calling `agp run --no-gates` whenever runs/latest is not complete.
"""
from __future__ import annotations

import argparse
import shutil

import pytest

from agp import runs, stages
from agp.cli import main
from agp.commands.run import _todo

TINY = ["--no-gates", "--baseline-prompts", "1", "--baseline-decode-tokens", "2",
        "--adapter-iters", "2", "--adapter-blocks", "1", "--adapter-max-seq", "96", "--adapter-eval-rows", "2",
        "--adapter-checkpoint-every", "2", "--controller-prompts", "16", "--controller-steps", "20",
        "--runtime-exit-layers", "2,3", "--runtime-prompts", "6", "--runtime-bench-prompts", "1",
        "--runtime-new-tokens", "4", "--runtime-long-prompt-tokens", "300", "--runtime-head-steps", "5",
        "--runtime-vocabs", "128"]


@pytest.fixture(scope="module")
def baseline_only(tiny_model_dir, tmp_path_factory):
    """A runs root whose only run has finished stage 0 and nothing else."""
    root = tmp_path_factory.mktemp("baseline-only")
    model = tiny_model_dir["gemma3_text"]
    assert main(["run", "--stage", "baseline", "--runs", str(root), "--model", model, *TINY]) == 0
    return root, model


def _copy_root(src, tmp_path):
    dst = tmp_path / "runs"
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_run_with_only_stage0_is_completed_not_restarted(baseline_only, tmp_path, capsys):
    root = _copy_root(baseline_only[0], tmp_path)
    before = runs.latest_run(root)
    started = before.stage("baseline")["started"]
    assert stages.missing(before) == [n for n in stages.implemented() if n != "baseline"]
    assert main(["run", "--runs", str(root), "--model", baseline_only[1], *TINY]) == 0
    out = capsys.readouterr().out
    assert f"completing unfinished run {before.id}" in out
    after = runs.latest_run(root)
    assert after.id == before.id and not stages.missing(after)
    assert after.stage("baseline")["started"] == started, "a finished stage must be read, not re-run"
    assert f"agp: run {after.id}" in out and "report:" in out, "the end-of-run table must name the report"


def test_failed_and_interrupted_stages_are_rerun(baseline_only, tmp_path, capsys):
    root = _copy_root(baseline_only[0], tmp_path)
    run = runs.latest_run(root)
    run.update_stage("adapter", status="running", started=1.0)  # killed mid-stage
    run.update_stage("controller", status="failed", started=1.0, error="boom")
    assert main(["run", "--runs", str(root), "--model", baseline_only[1], *TINY]) == 0
    assert "(to do: adapter, controller" in capsys.readouterr().out  # runtime, after them, too
    again = runs.latest_run(root)
    assert again.id == run.id
    for name in ("adapter", "controller"):
        assert again.stage(name)["status"] == "done" and again.stage(name)["started"] > 1.0, name


def test_unfinished_run_of_other_code_starts_fresh(baseline_only, tmp_path, capsys):
    root = _copy_root(baseline_only[0], tmp_path)
    old = runs.latest_run(root)
    old.manifest["git_commit"] = "0" * 40
    old.save()
    assert main(["run", "--runs", str(root), "--model", baseline_only[1], *TINY]) == 0
    assert "new run" in capsys.readouterr().out
    assert runs.latest_run(root).id != old.id


def test_stage_runs_the_stages_it_needs_first(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir["gemma3_text"]
    assert main(["run", "--stage", "controller", "--runs", str(tmp_path), "--model", model, *TINY]) == 0
    assert "first running the stages it needs that the run lacks: baseline" in capsys.readouterr().out
    run = runs.latest_run(tmp_path)
    assert stages.finished(run.stage("baseline")) and stages.finished(run.stage("controller"))
    assert not run.stage("adapter"), "controller does not need the adapter"
    merged = run.manifest["config"]["controller"]
    assert merged["heads"]["steps"] == 20 and merged["prompts"] == 16, "the manifest records the merged config"


def test_finished_stage_with_a_failed_gate_is_judged_again(tmp_path):
    run = runs.new_run(tmp_path, argv=["run"])
    run.update_stage("baseline", status="done", gate={"outcome": "failed"})
    run.update_stage("adapter", status="done", gate={"outcome": "passed"})
    run.update_stage("controller", status="done", gate={"outcome": "not run"})
    assert _todo(run, None, gated=True)[:2] == ["baseline", "controller"]
    assert "baseline" not in _todo(run, None, gated=False)


def test_stage_choices_are_only_implemented_stages():
    from agp.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    stage = next(a for a in sub._actions if a.dest == "stage")
    assert list(stage.choices) == list(stages.implemented())


def test_stage_for_another_model_does_not_reuse_the_latest_run(baseline_only, tiny_model_dir, tmp_path, capsys):
    root = _copy_root(baseline_only[0], tmp_path)
    old = runs.latest_run(root)
    other = tiny_model_dir["gemma4_text"]
    assert main(["run", "--stage", "baseline", "--runs", str(root), "--model", other, *TINY]) == 0
    assert "was made for model" in capsys.readouterr().out
    new = runs.latest_run(root)
    assert new.id != old.id and new.manifest["config"]["model"] == other
