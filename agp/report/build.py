"""Assemble runs/<id>/report.md from each stage's fragment (<stage>/report.md), in curriculum order."""
from __future__ import annotations

from agp import io
from agp.stages import ORDER


def build(run) -> str:
    """Rewrite the run's report.md; returns its path."""
    m = run.manifest
    parts = [f"# AGP run `{m['run_id']}`\n",
             f"- created: {m['created']}\n- git commit: `{m.get('git_commit')}`\n"
             f"- platform: {m['platform']['system']} {m['platform']['machine']}, {m['platform']['cpus']} CPUs, "
             f"BLAS {m['platform']['blas']['blas']}\n- reproduce: `{m['reproduce']}`\n"]
    gates = []
    for name, _ in ORDER:
        rec = run.stage(name)
        if not rec:
            continue
        g = rec.get("gate", {})
        gates.append(f"| {name} | {rec.get('status')} | {g.get('outcome', '-')} | {g.get('summary', '')} |")
    parts.append("| stage | status | gate | summary |\n|---|---|---|---|\n" + "\n".join(gates) + "\n")
    for name, _ in ORDER:
        frag = run.path / name / "report.md"
        if frag.exists():
            parts.append(frag.read_text())
    path = run.path / "report.md"
    io.write_text(path, "\n".join(parts))
    return str(path)
