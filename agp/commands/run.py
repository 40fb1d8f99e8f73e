"""`agp run`: run the curriculum (or one stage) into a run directory, gating each stage."""
from __future__ import annotations

import subprocess
import sys
import time
import traceback
from pathlib import Path

from agp import runs, train
from agp.errors import AGPError


def add_parser(sub):
    p = sub.add_parser(
        "run", help="run every implemented stage in order (or one with --stage)",
        description="Run the staged curriculum. Without --stage: a new run in runs/<run_id>/ with every "
                    "implemented stage in order, each followed by its gate; a failing gate stops the run. "
                    "With --stage NAME: that stage only, on top of the latest run's earlier artifacts.")
    p.add_argument("--stage", choices=[n for n, _ in train.ORDER], help="run only this stage")
    p.add_argument("--run-dir", help="run directory to add to (default: new run, or runs/latest with --stage)")
    p.add_argument("--runs", help="directory holding runs (default: $AGP_RUNS or ./runs)")
    p.add_argument("--model", default=None,
                   help="mlx-lm model directory or hub id (default: the embedded Gemma 3 270M)")
    p.add_argument("--no-gates", action="store_true", help="do not run the stage gates (not recommended)")
    for mod in train.implemented().values():
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p.add_argument_group(f"stage '{mod.NAME}'"))
    p.set_defaults(func=main)


def main(args) -> int:
    stages = train.implemented()
    if args.stage and args.stage not in stages:
        raise AGPError(f"stage '{args.stage}' is not implemented yet; implemented: {', '.join(stages)}")
    argv = getattr(args, "argv", None) or ["run"]
    if args.run_dir:
        run = runs.Run(args.run_dir)
    elif args.stage and (runs.runs_root(args.runs) / "latest").exists():
        run = runs.latest_run(args.runs)
    else:
        run = runs.new_run(args.runs, argv=argv, config={"model": args.model})
    print(f"agp: run {run.id} at {run.path}")
    todo = [args.stage] if args.stage else list(stages)
    for name in todo:
        mod = stages[name]
        for req in mod.REQUIRES:
            run.require(req, name)
        if not run_stage(run, mod, args):
            return 1
    return 0


def run_stage(run: runs.Run, mod, args) -> bool:
    """Run one stage and its gate; record both in the manifest. True if the gate passed."""
    name = mod.NAME
    print(f"agp: stage '{name}' ...")
    run.update_stage(name, status="running", started=time.time())
    t0 = time.perf_counter()
    try:
        metrics = mod.run(run, args)
    except AGPError:
        run.update_stage(name, status="failed")
        raise
    except Exception:
        run.update_stage(name, status="failed", error=traceback.format_exc(limit=5))
        raise
    run.update_stage(name, status="done", metrics=metrics, seconds=round(time.perf_counter() - t0, 2))
    from agp.report.build import build
    build(run)  # before the gate too: gates check the report exists
    if args.no_gates:
        run.update_stage(name, gate={"outcome": "not run", "summary": "--no-gates"})
        build(run)
        return True
    outcome = run_gate(run, mod.MARKER)
    run.update_stage(name, gate=outcome)
    build(run)
    print(f"agp: gate {mod.MARKER}: {outcome['outcome']} ({outcome['summary']})")
    return outcome["outcome"] == "passed"


def run_gate(run: runs.Run, marker: str) -> dict:
    """Run `pytest -m MARKER gates/` against this run in a subprocess; summarise the outcome."""
    gates = Path(__file__).resolve().parents[2] / "gates"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, str(gates),
           f"--agp-run={run.path.resolve()}", "--rootdir", str(gates.parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = tail[-1].strip("= ") if tail else proc.stderr.strip()[-200:]
    outcome = "passed" if proc.returncode == 0 else "failed"
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
    return {"outcome": outcome, "summary": summary, "command": " ".join(cmd[1:])}
