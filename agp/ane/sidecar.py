"""The Neural Engine sidecar: the routed mode's controller served by its Core ML package.

`CoreMLController` answers the two calls the routed decoder makes on a controller, `logits(feats)`
and `macs()`, through Core ML on the compute units asked for (CPU_AND_NE puts it on the Neural
Engine where Core ML agrees), so the MLX trunk keeps the GPU. The routed loop decides one
position per token, so the package must be exported with one position per call; it must also
come from the run's current controller weights (its source fingerprint). Both are checked on
every platform before Core ML is asked to load it, which only macOS can do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from agp.ane import coreml
from agp.errors import AGPError

PACKAGE = "controller.mlpackage"


class CoreMLController:
    def __init__(self, ctl, package: Path, compute_units: str):
        self.ctl, self.package, self.compute_units = ctl, Path(package), compute_units
        self.n_in, self.n_out = ctl.n_in, ctl.n_out
        self.model = coreml.load_model(self.package, compute_units)

    def logits(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        outs = [coreml.predict(self.package, {"x": coreml.to_channels_first(row[None])}, self.compute_units, self.model)
                for row in np.asarray(feats, np.float32)]
        return {t: np.stack([coreml.from_channels_first(o[t])[0] for o in outs]).astype(np.float32) for t in self.n_out}

    def macs(self) -> int:
        return self.ctl.macs()


def serve_controller(run_dir, controller: tuple, compute_units: str) -> tuple:
    """(CoreMLController, calibration) in place of the run's (Controller, calibration)."""
    from agp.ane.export import available
    ctl, calib = controller
    package = Path(run_dir) / "ane" / PACKAGE
    export_hint = "`agp export coreml --heads controller --positions 1`"
    if not package.exists():
        raise AGPError(f"no Core ML controller at {package}; export it with {export_hint}")
    rb = coreml.read_back(package)
    positions = int(rb.metadata.get("agp.positions", 0))
    if positions != 1:
        raise AGPError(f"{package.name} decides {positions} positions per call, the routed loop one per token; "
                       f"re-export it with {export_hint}")
    coreml.check_provenance(rb, package, available(run_dir, ["controller"])[0].sha256())
    return CoreMLController(ctl, package, compute_units), calib


def compare_loops(bb, heads, sidecar_heads, prompts, new_tokens: int, meter=None) -> list[dict]:
    """The routed loop with the controller in MLX and on the sidecar, on the same prompts in one
    process: tok/s of each (does serving the controller elsewhere free the trunk?), whether the
    two emit the same tokens (the decisions survive fp16 Core ML), and each run's energy."""
    from agp.runtime.measure import agreement, run_mode
    rows = []
    for name, ids in prompts:
        mlx = run_mode(bb, "routed", heads, ids, new_tokens, name, meter=meter)
        side = run_mode(bb, "routed", sidecar_heads, ids, new_tokens, name, meter=meter)
        rows.append({"prompt": name, "mlx_tok_s": mlx.tok_s, "sidecar_tok_s": side.tok_s,
                     "sidecar_speedup": side.tok_s / mlx.tok_s if mlx.tok_s else None,
                     "same_tokens": agreement(side.tokens, mlx.tokens), "mlx_energy": mlx.energy,
                     "sidecar_energy": side.energy})
    return rows
