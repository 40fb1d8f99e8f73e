"""Gates read a finished run: --agp-run DIR, env AGP_RUN, or runs/latest.

When no run exists (a clean CI clone), the gate session first produces one with
`agp run` on the default model, so `pytest` alone checks the real thing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from agp import runs


def pytest_addoption(parser):
    parser.addoption("--agp-run", default=None, help="run directory the gates read (default $AGP_RUN or runs/latest)")


@pytest.fixture(scope="session")
def agp_run(request) -> runs.Run:
    path = request.config.getoption("--agp-run") or os.environ.get("AGP_RUN")
    if path:
        return runs.Run(path)
    root = runs.runs_root()
    if not (root / "latest").exists():
        from agp.cli import main
        rc = main(["run", "--no-gates"])
        assert rc == 0, "agp run failed while producing the run the gates read"
    return runs.latest_run()


def stage_record(run: runs.Run, stage: str) -> dict:
    """The stage's manifest record; fails (never skips) if the stage did not finish."""
    rec = run.stage(stage)
    assert rec.get("status") == "done", f"stage '{stage}' did not finish in run {run.path}"
    return rec
