"""Core ML export of the shallow heads: export time per head kind (time_; `exit` exports every
exit head, `depth` every depth module), package size and wiring error of its first module (track_), and on macOS Core ML prediction time per compute unit at S = 8 (time_predict).

Reads a finished run (env AGP_RUN, else runs/latest) with its controller and runtime stages.
Without one, or without coremltools, the benchmarks are skipped (asv reports them as not run).
Compare time_predict_* with the MLX module's time_mlx_* in the same asv run: the ratio is the result.
"""
import agp  # noqa: F401  (fast BLAS before mlx)
import os
import platform
import tempfile
from pathlib import Path

POSITIONS = 8


def _run_dir() -> str:
    p = Path(os.environ.get("AGP_RUN") or Path(os.environ.get("AGP_RUNS", "runs")) / "latest").resolve()
    if not (p / "runtime" / "runtime.json").exists() or not (p / "controller" / "heads" / "heads.json").exists():
        raise NotImplementedError(f"no finished controller and runtime stages at {p}; run `agp run` first")
    from agp.ane.coreml import _coremltools
    from agp.errors import AGPError
    try:
        _coremltools()
    except AGPError as e:
        raise NotImplementedError(str(e)) from None
    return str(p)


class Export:
    timeout = 600
    number = 1
    repeat = 3
    params = ["controller", "exit", "depth", "revive", "draft"]
    param_names = ["head"]

    def setup_cache(self):
        from agp.ane.export import export_run
        path = _run_dir()
        out = tempfile.mkdtemp(prefix="agp-asv-ane-")
        return path, export_run(path, out_dir=out, positions=POSITIONS), out

    def setup(self, cache, head):
        from agp.ane.export import module_kind
        self.path, self.record, self.out = cache
        names = [n for n in self.record["modules"] if module_kind(n) == head]
        if not names:
            raise NotImplementedError(f"the run has no {head} head (its stage has not run)")
        self.name = names[0]

    def time_export(self, cache, head):
        from agp.ane.export import export_run
        export_run(self.path, [head], POSITIONS, out_dir=tempfile.mkdtemp(prefix="agp-asv-ane-"))

    def track_package_megabytes(self, cache, head):
        return self.record["modules"][self.name]["bytes"] / 1e6
    track_package_megabytes.unit = "MB"

    def track_wiring_rel_err(self, cache, head):
        wiring = self.record["modules"][self.name]["parity"]["wiring"]
        return max(w["rel_err"] for w in wiring.values() if "rel_err" in w)
    track_wiring_rel_err.unit = "max |err| / max |output|"


class Predict:
    """Core ML prediction of the exported controller per compute unit (macOS only) against MLX."""
    timeout = 600
    params = ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"]
    param_names = ["compute_units"]

    def setup_cache(self):
        from agp.ane.export import export_run
        path = _run_dir()
        out = tempfile.mkdtemp(prefix="agp-asv-ane-")
        export_run(path, ["controller"], POSITIONS, out_dir=out)
        return path, out

    def setup(self, cache, units):
        from agp.ane.coreml import to_channels_first
        from agp.ane.export import held_out_features
        from agp.heads.controller import Controller
        path, out = cache
        self.ctl = Controller.load(Path(path) / "controller" / "heads")
        self.x = held_out_features(path, POSITIONS)
        self.feed = {"x": to_channels_first(self.x)}
        self.package = Path(out) / "controller.mlpackage"
        self.model = None
        if platform.system() == "Darwin":
            import coremltools as ct
            self.model = ct.models.MLModel(str(self.package), compute_units=getattr(ct.ComputeUnit, units))

    def time_mlx_controller(self, cache, units):
        self.ctl.logits(self.x)

    def time_predict_controller(self, cache, units):
        if self.model is None:
            raise NotImplementedError("Core ML prediction needs macOS")
        self.model.predict(self.feed)
