"""One entry point per curriculum stage, run in order by `agp run`.

A stage module `agp/train/<name>.py` defines:
  NAME: str                      the stage name (DESIGN.md table)
  MARKER: str                    its pytest gate marker ("stage0", ...)
  REQUIRES: list[str]            earlier stages whose artifacts it reads
  add_arguments(parser)          its own `agp run` flags (optional)
  run(run: agp.runs.Run, args) -> dict   do the work, write into run.stage_dir(NAME), return metrics
"""
from __future__ import annotations

import importlib

# Curriculum order; a stage whose module does not exist yet is "not implemented".
ORDER = [
    ("baseline", "agp.train.baseline"),
    ("adapter", "agp.train.adapter"),
    ("controller", "agp.train.controller"),
    ("runtime", "agp.train.runtime"),
    ("depth", "agp.train.depth"),
    ("semantic", "agp.train.semantic"),
    ("transfer", "agp.train.transfer"),
    ("joint", "agp.train.joint"),
]


def implemented() -> dict:
    """name -> module for every stage that has a module, in curriculum order."""
    out = {}
    for name, modname in ORDER:
        try:
            out[name] = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if not (e.name and modname.startswith(e.name)):
                raise
    return out
