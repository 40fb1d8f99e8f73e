"""Gates read a finished run: --agp-run DIR, env AGP_RUN, or runs/latest.

Without --agp-run / AGP_RUN the gates read runs/latest when it is complete. When there is no run, or
the latest is unfinished (a stage missing, interrupted or failed), the session first runs
`agp run --no-gates`, which completes that run or starts a fresh one (README "Runs are complete or
refused") and says which, so `pytest` alone checks the real thing and never reads a half-run.
An explicitly named run is read as it is: a stage it lacks fails its gates.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from agp import runs, stages


def pytest_addoption(parser):
    parser.addoption("--agp-run", default=None, help="run directory the gates read (default $AGP_RUN or runs/latest)")


@pytest.fixture(scope="session")
def agp_run(request) -> runs.Run:
    path = request.config.getoption("--agp-run") or os.environ.get("AGP_RUN")
    if path:
        return runs.Run(path)
    latest = runs.latest_or_none()
    if latest is not None and not stages.missing(latest):
        _say(request, f"gates: reading complete run {latest.id} (commit {latest.manifest.get('git_commit')})")
        return latest
    from agp.cli import main
    with _uncaptured(request):
        rc = main(["run", "--no-gates"])
    assert rc == 0, "agp run failed while producing the run the gates read"
    return runs.latest_run()


def _uncaptured(request):
    """Let the curriculum's progress and its one-line choice reach the terminal."""
    return request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled()


def _say(request, line: str) -> None:
    with _uncaptured(request):
        print(line, flush=True)


def stage_record(run: runs.Run, stage: str) -> dict:
    """The stage's manifest record; fails (never skips) if the stage did not finish."""
    rec = run.stage(stage)
    assert rec.get("status") == "done", f"stage '{stage}' did not finish in run {run.path}"
    return rec
