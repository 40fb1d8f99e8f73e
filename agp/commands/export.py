"""`agp export coreml --run RUN`: Core ML packages of a run's shallow heads, checked on this platform."""
from __future__ import annotations

from pathlib import Path

from agp.errors import AGPError


def add_parser(sub):
    p = sub.add_parser("export", help="export a run's heads (coreml: Core ML mlprogram packages for the Neural Engine)",
                       description="Export the shallow heads of a run (the stage-2 controller, the runtime's exit heads and "
                                   "feature draft head, the depth stage's modules and revive operation). `coreml` "
                                   "builds one Core ML mlprogram per head "
                                   "with coremltools' MIL builder (fp16, channels-first (1, C, 1, S), 1x1 convolutions), "
                                   "writes it atomically into RUN/ane/, reads it back and checks structure, exact fp16 "
                                   "weight parity and the program's wiring (evaluated in numpy) against MLX. Core ML "
                                   "prediction, Neural Engine placement and latency need macOS.")
    p.add_argument("target", choices=["coreml"], help="export format")
    p.add_argument("--run", default=None, help="run directory (default runs/latest)")
    p.add_argument("--heads", default=None, help="comma-separated subset of: controller, exit, depth, revive, draft (default: every "
                        "head the run has; the controller and exit heads are required)")
    p.add_argument("--positions", type=int, default=8, metavar="S",
                   help="positions per prediction, fixed in the package (default 8; 1 = one decision per token)")
    p.add_argument("--model", default=None, help="mlx-lm model directory (default: the run's backbone)")
    p.add_argument("--verify", action="store_true",
                   help="re-check the packages already in RUN/ane/ against the run's current heads (refused when a "
                        "head changed since the export), without exporting")
    p.set_defaults(func=main)


def main(args) -> int:
    from agp.ane.export import export_run
    from agp.runs import Run, latest_run

    if args.positions < 1:
        raise AGPError(f"--positions must be >= 1, got {args.positions}")
    run = Run(Path(args.run)) if args.run else latest_run()
    if args.verify:
        return _verify(run, args)
    heads = None if args.heads is None else [h.strip() for h in args.heads.split(",") if h.strip()]
    print(f"agp export: exporting {', '.join(heads or ['every landed head'])} of run {run.path}")
    record = export_run(run.path, heads, args.positions, args.model,
                        progress=lambda name, e: print(f"agp export: wrote {run.path / 'ane' / e['package']}"))
    run.manifest.setdefault("exports", {})["coreml"] = {
        "record": run.relative(run.path / "ane" / "export.json"), "argv": ["agp", *getattr(args, "argv", [])],
        "modules": {n: {k: e[k] for k in ("package", "source_sha256", "package_sha256", "bytes", "inputs",
                                           "compute_precision")} for n, e in record["modules"].items()}}
    run.save()
    return _report(run, record)


def _verify(run, args) -> int:
    from agp.ane.export import read_record, verify_run
    print(f"agp export: checking the packages in {run.path / 'ane'} against the run's current heads")
    record = read_record(run.path / "ane")
    for name, parity in verify_run(run.path, model=args.model).items():
        record["modules"][name]["parity"] = parity
    return _report(run, record)


def _report(run, record: dict) -> int:
    from agp.ane.export import summary_rows
    for row in summary_rows(record):
        print(row)
    bad = [n for n, e in record["modules"].items() if not (e["parity"]["shapes_ok"] and e["parity"]["weights_exact"])]
    if bad:
        print(f"agp export: parity FAILED for {', '.join(bad)} (see {run.path / 'ane' / 'export.json'})")
        return 1
    return 0
