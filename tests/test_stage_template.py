"""The stage template (agp/train/template.py) runs end to end and keeps the stage contract."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from agp import config
from agp.errors import AGPError
from agp.runs import new_run
from agp.train import template


def test_template_keeps_the_stage_contract():
    assert template.NAME and template.MARKER and isinstance(template.REQUIRES, list)
    assert template.CONFIG is template.TemplateArgs and template.HEADLINE
    for f in dataclasses.fields(template.TemplateArgs):
        assert f.metadata.get("help"), f"{f.name} needs help metadata: it becomes a flag"


def test_template_runs_into_a_run_directory(tmp_path):
    run = new_run(tmp_path, argv=["run"], config={})
    metrics = template.run(run, argparse.Namespace(template__draws=500, template__seed=3))
    assert metrics["config"] == {"draws": 500, "seed": 3} and 0.8 < metrics["std"] < 1.2
    summary = json.loads((run.path / template.NAME / "summary.json").read_text())
    assert summary["mean"] == metrics["mean"]
    assert template.run(run, argparse.Namespace(template__draws=500, template__seed=3)) == metrics  # seeded


def test_template_refuses_a_bad_config(tmp_path):
    with pytest.raises(AGPError, match="--template-draws must be at least 2"):
        config.resolve(template.TemplateArgs, template.NAME, argparse.Namespace(template__draws=1))
