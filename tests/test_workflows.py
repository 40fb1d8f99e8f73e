"""The Apple Silicon workflow cannot run here, so what can drift is checked here: every `agp`
command it runs must parse with today's CLI, and it installs with the README's commands."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from agp.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "apple-silicon.yml"


def _steps() -> list[str]:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    return [step["run"] for job in jobs.values() for step in job["steps"] if "run" in step]


def _agp_commands(script: str) -> list[list[str]]:
    parts = re.split(r"\|\||&&|\||;|\n", script)
    return [shlex.split(p.strip())[1:] for p in parts if p.strip().startswith(".venv/bin/agp")]


def test_every_agp_command_in_the_workflow_parses():
    commands = [c for script in _steps() for c in _agp_commands(script)]
    assert len(commands) >= 4, commands
    for argv in commands:
        build_parser().parse_args(argv)      # an unknown flag or command raises (AGPError)


def test_the_workflow_installs_with_the_readme_commands_and_runs_the_mac_tests():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("<!-- ci: quick-start"):readme.index("<!-- end ci: quick-start -->")]
    first = next(line for line in block.splitlines() if line.startswith("./")).split("#")[0].strip()
    scripts = "\n".join(_steps())
    assert first in scripts and "./install.sh --dev" in scripts
    assert 'pytest -m "macos or stage6"' in scripts
