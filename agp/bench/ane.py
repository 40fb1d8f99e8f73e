"""Shallow heads' latency: MLX (CPU, and GPU on Apple silicon) against Core ML per compute unit.

Per exported module and per batch (S positions per call: 1 = one decision per token, k = a
drafted round), the median and p95 latency of the MLX module the runtime calls today and, on
macOS, of its Core ML package on CPU_ONLY, CPU_AND_GPU and CPU_AND_NE, with the ops' preferred
devices from the compute plan (did it really place on the Neural Engine?) and the package's
output parity against MLX. Ratios are taken against MLX on its default device in the same
process. Off macOS only the MLX rows can be measured; the table says so instead of guessing.
"""
from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agp.errors import AGPError


def add_arguments(p):
    p.add_argument("--run", default=None, help="run with the controller and runtime stages (default runs/latest)")
    p.add_argument("--model", default=None, help="backbone directory (default: the one the run's heads were made on)")
    p.add_argument("--heads", default=None, help="comma-separated subset of: controller, exit, depth, revive, draft")
    p.add_argument("--positions", default="1,8", metavar="S[,S...]",
                   help="positions per call to time (default 1,8: one decision per token, and a batch)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per row after 3 warm-up calls (default 30)")
    p.add_argument("--units", default="CPU_ONLY,CPU_AND_GPU,CPU_AND_NE", help="Core ML compute units (macOS)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-save", action="store_true", help="do not write RUN/ane/latency.json")


@dataclass
class Report:
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    platform: str = ""

    def to_dict(self) -> dict:
        return {"rows": self.rows, "notes": self.notes, "platform": self.platform}


def positions_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AGPError(f"--positions must be comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise AGPError(f"--positions must list integers >= 1, got {text!r}")
    return out


def mlx_devices() -> list[str]:
    import mlx.core as mx
    return ["cpu"] + (["gpu"] if mx.metal.is_available() else [])


def time_rows(fn, repeats: int) -> dict:
    from agp.bench.timer import samples
    ms = samples(fn, repeats, warmup=3) * 1e3
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95))}


def mlx_rows(mod, repeats: int) -> list[dict]:
    """The MLX module on each device MLX has here."""
    import mlx.core as mx
    rows, default = [], mx.default_device()
    try:
        for device in mlx_devices():
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
            rows.append({"backend": f"mlx {device}", **time_rows(lambda: mod.forward(mod.inputs), repeats)})
    finally:
        mx.set_default_device(default)
    return rows


def coreml_rows(mod, package: Path, units: list[str], repeats: int) -> list[dict]:
    """The package on each compute unit: latency, preferred devices, parity against MLX."""
    from agp.ane import coreml
    from agp.ane.export import compare
    feeds = {n: coreml.to_channels_first(v) for n, v in mod.inputs.items()}
    ref = mod.reference()
    rows = []
    for unit in units:
        model = coreml.load_model(package, unit)
        got = coreml.predict(package, feeds, unit, model)
        rows.append({"backend": f"coreml {unit}", **time_rows(lambda: coreml.predict(package, feeds, unit, model), repeats),
                     "placement": coreml.placement(model, unit), "parity": compare(got, ref)})
    return rows


def measure(run_dir: Path, heads, positions: list[int], repeats: int, units: list[str], model=None) -> Report:
    from tqdm import tqdm

    from agp.ane import coreml
    from agp.ane.export import available, load_module, run_backbone
    sources = available(run_dir, heads)
    bb = run_backbone(run_dir, sources, model)
    on_mac = platform.system() == "Darwin"
    report = Report(platform=f"{platform.system()} {platform.machine()}")
    if not on_mac:
        report.notes.append(f"Core ML rows not measured: {coreml.MACOS_ONLY}")
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(sources) * len(positions), desc="modules x batches",
                                                    unit="module") as bar:
        for s in positions:
            for src in sources:
                mod = load_module(src, bb, run_dir, s)
                rows = mlx_rows(mod, repeats)
                if on_mac:
                    entry = coreml.export(mod.spec, Path(tmp), s)
                    rows += coreml_rows(mod, Path(tmp) / entry["package"], units, repeats)
                # the anchor: MLX on the device it would use by default (the GPU where there is one)
                anchor = next(r["median_ms"] for r in rows if r["backend"] == f"mlx {mlx_devices()[-1]}")
                for r in rows:
                    r.update(module=mod.spec.name, positions=s, per_position_us=r["median_ms"] * 1e3 / s,
                             speedup_vs_mlx=anchor / r["median_ms"] if r["median_ms"] > 0 else None)
                report.rows += rows
                bar.update(1)
    return report


def main(args) -> int:
    from agp import io
    from agp.runs import Run, latest_run
    if args.repeats < 1:
        raise AGPError(f"--repeats must be >= 1, got {args.repeats}")
    run = Run(Path(args.run)) if args.run else latest_run()
    heads = None if args.heads is None else [h.strip() for h in args.heads.split(",") if h.strip()]
    units = [u.strip() for u in args.units.split(",") if u.strip()]
    report = measure(run.path, heads, positions_list(args.positions), args.repeats, units, args.model)
    if not args.no_save:
        io.write_json(run.path / "ane" / "latency.json", {**report.to_dict(), "argv": ["agp", *getattr(args, "argv", [])]})
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"{'module':<14}{'S':>4}  {'backend':<22}{'median ms':>10}{'p95 ms':>9}{'us/pos':>9}{'x MLX':>7}  placement")
    for r in report.rows:
        place = ", ".join(f"{k} {v}" for k, v in (r.get("placement") or {}).items())
        print(f"{r['module']:<14}{r['positions']:>4}  {r['backend']:<22}{r['median_ms']:>10.3f}{r['p95_ms']:>9.3f}"
              f"{r['per_position_us']:>9.1f}{r['speedup_vs_mlx'] or 0:>7.2f}  {place}")
    for note in report.notes:
        print(f"note: {note}")
    return 0
