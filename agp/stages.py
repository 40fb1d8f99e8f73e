"""The curriculum: its order, which stages are implemented, and what makes a run complete.

A stage module `agp/train/<name>.py` defines:
  NAME: str                      the stage name (DESIGN.md table)
  MARKER: str                    its pytest gate marker ("stage0", ...)
  REQUIRES: list[str]            earlier stages whose artifacts it reads
  HEADLINE: dict[str, str]       label -> dotted path into its metrics, shown at the end of `agp run`
  CONFIG: type                   its @dataclass config: `--<name>-<field>` flags and the `<name>:` section
                                 of `agp run --config` (agp/config.py); ALIASES keeps older flag names
  run(run: agp.runs.Run, args) -> dict   do the work, write into run.stage_dir(NAME), return metrics

Completeness rule (README "Runs are complete or refused"): a stage counts as finished only when its
manifest record says status "done"; "running" (interrupted), "failed" or absent means it is re-run,
never read. A run is complete when every implemented stage is finished.
"""
from __future__ import annotations

import importlib

# Curriculum order; a stage whose module does not exist yet is "not implemented".
ORDER = [
    ("baseline", "agp.train.baseline"),
    ("adapter", "agp.train.adapter"),
    ("controller", "agp.train.controller"),
    # after the controller: the routed mode reads its heads; the exit heads need only the backbone and lanes
    ("runtime", "agp.train.runtime"),
    ("depth", "agp.train.depth"),
    ("semantic", "agp.train.semantic"),
    ("transfer", "agp.train.transfer"),
    ("serve", "agp.train.serve"),          # two hosts: the resume server over the transfer stage's wire
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


def names() -> list[str]:
    """Every stage name in curriculum order, implemented or not (report sections use this)."""
    return [name for name, _ in ORDER]


def finished(record: dict) -> bool:
    """True when a stage's manifest record may be read by later stages and gates."""
    return record.get("status") == "done"


def missing(run, wanted: list[str] | None = None) -> list[str]:
    """The stages of `wanted` (default: every implemented one) that the run has not finished."""
    wanted = list(implemented()) if wanted is None else wanted
    return [name for name in wanted if not finished(run.stage(name))]


def with_requirements(name: str) -> list[str]:
    """`name` preceded by every stage it needs, transitively, in curriculum order."""
    mods = implemented()
    need: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in need:
            continue
        need.add(current)
        todo.extend(getattr(mods[current], "REQUIRES", []))
    return [n for n in mods if n in need]


def headline(mod, metrics: dict | None) -> str:
    """The stage's one or two headline figures, formatted for the end-of-run table."""
    parts = []
    for label, path in getattr(mod, "HEADLINE", {}).items():
        value = metrics or {}
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            parts.append(f"{label} {value:.4g}" if isinstance(value, float) else f"{label} {value}")
    return ", ".join(parts)
