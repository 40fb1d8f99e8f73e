"""`agp run`: run the curriculum (or one stage) into a run directory, gating each stage.

Which run a command works on (the rule the README states under "Runs are complete or refused"):
- `--run-dir D`: that run.
- `--stage X`: the latest run (a new one if there is none); stages X needs that the run has not
  finished are run first, then X itself.
- neither: the latest run is completed when it is unfinished and was made by the same code
  (git commit) for the same model; otherwise a fresh run starts. `--fresh` always starts one.
A stage recorded as running (interrupted) or failed is re-run, never read; a finished stage whose
gate did not pass has its gate run again.

Under `mlx.launch` (more than one rank, docs/adapter.md "Across hosts") only `--stage adapter`
runs, on a run whose baseline is finished: rank 0 picks the run, trains with the others, writes
everything and runs the gate; every other rank only trains.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from agp import config, runs, stages
from agp.errors import AGPError


def add_parser(sub):
    implemented = list(stages.implemented())
    p = sub.add_parser(
        "run", help="run every implemented stage in order (or one with --stage)",
        description="Run the staged curriculum into runs/<run_id>/, each stage followed by its gate "
                    "(pytest -m stageN gates/); a failing gate stops the run. An unfinished latest run made by "
                    "the same code is completed rather than started again; see README 'Runs are complete or "
                    f"refused'. Implemented stages, in order: {', '.join(implemented)}.")
    p.add_argument("--stage", choices=implemented,
                   help="run only this stage (and any earlier stage it needs that the run lacks)")
    p.add_argument("--run-dir", help="run directory to add to (default: see the rule above)")
    p.add_argument("--runs", help="directory holding runs (default: $AGP_RUNS or ./runs)")
    p.add_argument("--fresh", action="store_true", help="always start a new run, even if the latest is unfinished")
    p.add_argument("--model", default=None,
                   help="mlx-lm model directory or hub id (default: the embedded Gemma 3 270M)")
    p.add_argument("--no-gates", action="store_true", help="do not run the stage gates (not recommended)")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file with one section per stage (e.g. `controller: {prompts: 40, heads: {steps: 100}}`) "
                        "and an optional top-level `model:`; merged over the stage defaults, flags win over it")
    for mod in stages.implemented().values():
        group = p.add_argument_group(f"stage '{mod.NAME}' (section '{mod.NAME}:' of --config)")
        config.add_arguments(group, mod.CONFIG, mod.NAME, getattr(mod, "ALIASES", None))
    p.set_defaults(func=main)


@dataclasses.dataclass
class Plan:
    """The run a command works on, the stages it runs, and the one line saying why."""
    run: runs.Run
    todo: list[str]
    reason: str


def main(args) -> int:
    resolve_configs(args)
    from agp.train import distributed
    world = distributed.world()
    if world.size > 1:
        return distributed_main(args, world)
    plan = choose_run(args)
    print(f"agp: {plan.reason}")
    mods = stages.implemented()
    ok = True
    for name in plan.todo:
        if not run_stage(plan.run, mods[name], args, rerun=name == args.stage):
            ok = False
            break
    print_summary(plan.run)
    return 0 if ok else 1


def distributed_main(args, world) -> int:
    """One rank of a data-parallel adapter run (see the module docstring)."""
    if args.stage != "adapter":
        raise AGPError(f"under mlx.launch ({world.size} ranks) only `agp run --stage adapter` runs across ranks; "
                       f"run the other stages without mlx.launch")
    mods = stages.implemented()
    if not world.writer:
        return mods["adapter"].worker(args)
    plan = choose_run(args)
    if not stages.finished(plan.run.stage("baseline")):
        raise AGPError(f"run {plan.run.path} has no finished baseline stage; run `agp run --stage baseline` "
                       f"(without mlx.launch) first, then launch the adapter stage with --run-dir")
    print(f"agp: {plan.reason} ({world.label}, backend {world.backend})")
    ok = run_stage(plan.run, mods["adapter"], args)
    print_summary(plan.run)
    return 0 if ok else 1


def resolve_configs(args) -> None:
    """Every stage's config (defaults < --config file < flags), checked before any stage runs."""
    data = config.load_file(getattr(args, "config", None))
    mods = stages.implemented()
    unknown = sorted(set(data) - set(mods) - {"model"})
    if unknown:
        import warnings
        warnings.warn(f"--config: ignoring unknown sections {unknown}; sections are {', '.join(mods)} and model",
                      UserWarning, stacklevel=2)
    if args.model is None:
        args.model = data.get("model")
    args.config_file_data = data
    args.configs = {name: config.resolve(mod.CONFIG, name, args, data) for name, mod in mods.items()}


def choose_run(args) -> Plan:
    """Apply the module docstring's rule."""
    argv = getattr(args, "argv", None) or ["run"]
    config = {"model": args.model}
    if args.run_dir:
        run = runs.Run(args.run_dir)
        return Plan(run, _todo(run, args.stage, gated=not args.no_gates), f"adding to run {run.id} at {run.path}")
    latest = None if args.fresh else runs.latest_or_none(args.runs)
    if args.stage:
        if latest is not None and latest.manifest.get("config", {}).get("model") != args.model:
            print(f"agp: the latest run {latest.id} was made for model "
                  f"{latest.manifest.get('config', {}).get('model') or 'embedded'}, not {args.model or 'embedded'}")
            latest = None
        run = latest or runs.new_run(args.runs, argv=argv, config=config)
        todo = _todo(run, args.stage)
        before = [n for n in todo if n != args.stage]
        extra = f"; first running the stages it needs that the run lacks: {', '.join(before)}" if before else ""
        return Plan(run, todo, f"stage '{args.stage}' on run {run.id} at {run.path}{extra}")
    if latest is not None:
        todo = _todo(latest, None, gated=not args.no_gates)
        if todo and _same_origin(latest, config):
            return Plan(latest, todo, f"completing unfinished run {latest.id} at {latest.path} "
                                      f"(to do: {', '.join(todo)})")
    run = runs.new_run(args.runs, argv=argv, config=config)
    return Plan(run, list(stages.implemented()), f"new run {run.id} at {run.path}")


def _todo(run: runs.Run, stage: str | None, gated: bool = False) -> list[str]:
    """Stages to (re-)run: the unfinished ones among `stage`'s requirements (or all), plus `stage`."""
    wanted = stages.with_requirements(stage) if stage else list(stages.implemented())
    todo = [n for n in wanted if n == stage or not stages.finished(run.stage(n))
            or (gated and run.stage(n).get("gate", {}).get("outcome") != "passed")]
    return todo


def _same_origin(run: runs.Run, config: dict) -> bool:
    """An unfinished run is completed only by the code and model that started it."""
    return (run.manifest.get("git_commit") == runs.git_commit()
            and run.manifest.get("config", {}).get("model") == config.get("model"))


def run_stage(run: runs.Run, mod, args, rerun: bool = True) -> bool:
    """Run one stage (unless finished and not asked for) and its gate; True if the gate passed."""
    name = mod.NAME
    if rerun or not stages.finished(run.stage(name)):
        execute_stage(run, mod, args)
    else:
        print(f"agp: stage '{name}' finished earlier; running its gate again")
    from agp.report.build import build
    build(run)  # before the gate too: gates check the report exists
    if args.no_gates:
        run.update_stage(name, gate={"outcome": "not run", "summary": "--no-gates"})
        build(run)
        return True
    outcome = run_gate(run, mod.MARKER, mod.NAME)
    run.update_stage(name, gate=outcome)
    build(run)
    print(f"agp: gate {mod.MARKER}: {outcome['outcome']} ({outcome['summary']})")
    for reason in outcome.get("failures", []):
        print(f"agp:   {reason}", file=sys.stderr)
    return outcome["outcome"] == "passed"


def execute_stage(run: runs.Run, mod, args) -> None:
    """Run the stage body, recording running / done / failed / interrupted in the manifest."""
    name = mod.NAME
    print(f"agp: stage '{name}' ...")
    run.manifest.setdefault("config", {})[name] = args.configs[name].to_dict()
    if getattr(args, "config", None):
        run.manifest["config"]["file"] = str(Path(args.config).resolve())
    run.update_stage(name, status="running", started=time.time(), metrics=None, gate={})
    t0 = time.perf_counter()
    try:
        metrics = mod.run(run, args)
    except AGPError as e:
        run.update_stage(name, status="failed", error=str(e))
        raise
    except KeyboardInterrupt:
        run.update_stage(name, status="interrupted")
        raise
    except Exception:
        run.update_stage(name, status="failed", error=traceback.format_exc(limit=5))
        raise
    run.update_stage(name, status="done", metrics=metrics, seconds=round(time.perf_counter() - t0, 2))


def gate_command(run: runs.Run, marker: str, stage: str | None = None) -> list[str]:
    gates = Path(__file__).resolve().parents[2] / "gates"
    if not gates.is_dir():
        raise AGPError(f"the gates folder {gates} is missing; install AGP from its checkout (./install.sh)")
    files = sorted(gates.glob(f"test_*_{stage}.py")) if stage else []
    return [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-m", marker,
            *[str(f) for f in files or [gates]], f"--agp-run={run.path.resolve()}", "--rootdir", str(gates.parent)]


def run_gate(run: runs.Run, marker: str, stage: str | None = None) -> dict:
    """Run `pytest -m MARKER gates/test_*_<stage>.py` against this run in a subprocess; summarise
    the outcome. Two stages can share a curriculum marker (runtime and transfer are both stage 5),
    so a stage's own gate is its files: the other stage's tests must not run before it exists."""
    cmd = gate_command(run, marker, stage)
    # a wide "terminal" keeps pytest from cutting the failure reasons in its short summary
    from agp.train.distributed import clean_env
    # without the launcher's variables: the gate is one process, not a rank of the training group
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**clean_env(os.environ), "COLUMNS": "4000"})
    lines = [ln.strip() for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else proc.stderr.strip()[-200:]
    outcome = "passed" if proc.returncode == 0 else "failed"
    failures = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    if proc.returncode != 0 and not failures:
        print(proc.stdout[-4000:] + proc.stderr[-2000:], file=sys.stderr)
    return {"outcome": outcome, "summary": summary, "failures": failures, "command": " ".join(cmd[1:])}


def print_summary(run: runs.Run) -> None:
    """The end of `agp run`: one row per stage of the run, then where the report is."""
    mods = stages.implemented()
    rows = [("stage", "status", "seconds", "gate", "headline")]
    for name, mod in mods.items():
        rec = run.stage(name)
        if not rec:
            rows.append((name, "not run", "-", "-", ""))
            continue
        seconds = rec.get("seconds")
        rows.append((name, rec.get("status", "?"), f"{seconds:.0f}" if seconds is not None else "-",
                     rec.get("gate", {}).get("outcome", "-"), stages.headline(mod, rec.get("metrics"))))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"agp: run {run.id}")
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4])
    report = run.path / "report.md"
    if report.exists():
        print(f"agp: report: {report}")
