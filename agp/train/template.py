"""Stage template: the shape every stage module has. Copy it to agp/train/<name>.py to add a stage.

Not a curriculum stage itself (agp/stages.py ORDER does not list it). What it measures is only a
placeholder: the spread of seeded Gaussian draws, so that `tests/test_stage_template.py` can run
it end to end. A real stage replaces `measure` with its own named steps (collect, train,
calibrate, ...), keeping the rule: `run` only calls steps, each step is a small function that
returns a small dataclass, and one step writes every artifact. See docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agp import config, io
from agp.config import ConfigMixin
from agp.errors import AGPError

NAME = "template"            # `agp run --stage NAME`; the folder <run>/NAME/
MARKER = "stage_template"    # the pytest marker of its gate (gates/test_stageN_<name>.py)
REQUIRES: list[str] = []     # earlier stages `agp run` finishes before this one (agp/stages.py)
HEADLINE = {"std": "std"}    # label -> dotted metrics path, shown in the end-of-run table


@dataclass
class TemplateArgs(ConfigMixin):
    """Every field is a flag `--template-<field>` and a key under `template:` in `agp run --config`."""
    draws: int = field(default=1000, metadata={"help": "Gaussian draws measured"})
    seed: int = field(default=0, metadata={"help": "random seed (the stage is reproducible)"})

    def validate(self) -> None:
        """Called once the defaults, the --config section and the flags are merged."""
        if self.draws < 2:
            raise AGPError(f"--{NAME}-draws must be at least 2, got {self.draws}")


def run(run, args) -> dict:
    """Measure, write the artifacts, return the metrics the manifest records."""
    cfg = config.for_stage(TemplateArgs, NAME, args)
    measured = measure(cfg)
    write_artifacts(run.stage_dir(NAME), measured)
    return stage_metrics(cfg, measured)


@dataclass
class Measured:
    values: np.ndarray
    mean: float
    std: float


def measure(cfg: TemplateArgs) -> Measured:
    values = np.random.default_rng(cfg.seed).standard_normal(cfg.draws)
    return Measured(values, float(values.mean()), float(values.std()))


def write_artifacts(out, measured: Measured) -> None:
    """Every file the stage leaves, written atomically (agp/io.py)."""
    io.write_json(out / "summary.json", {"mean": measured.mean, "std": measured.std})
    io.write_text(out / "report.md", f"## Template stage\n\nmean {measured.mean:.4f}, std {measured.std:.4f}\n")


def stage_metrics(cfg: TemplateArgs, measured: Measured) -> dict:
    return {"config": cfg.to_dict(), "mean": measured.mean, "std": measured.std}


CONFIG = TemplateArgs  # the dataclass `agp run` makes the stage's flags and --config section from
