"""Stage-2 controller: decision latency per token (time_/peakmem_) and held-out quality (track_).

Reads the controller a finished run saved (env AGP_RUN, else runs/latest): the heads, their
calibration and the stored held-out hidden-state features. Without such a run the benchmarks are
skipped (asv reports them as not run) — produce one with `agp run`.
"""
import agp  # noqa: F401  (fast BLAS before mlx)
import os
from pathlib import Path

import numpy as np


def _run_dir():
    p = Path(os.environ.get("AGP_RUN") or Path(os.environ.get("AGP_RUNS", "runs")) / "latest")
    d = p.resolve() / "controller"
    if not (d / "heads" / "heads.json").exists() or not (d / "features.npz").exists():
        # asv's documented way to skip a benchmark whose inputs are missing
        raise NotImplementedError(f"no finished controller stage at {p}; run `agp run` first")
    return str(d)


class Controller:
    timeout = 120

    def setup_cache(self):
        return _run_dir()

    def setup(self, d):
        from agp.heads.controller import load_deployed
        self.ctl, self.calib = load_deployed(Path(d) / "heads")
        z = np.load(Path(d) / "features.npz")
        ho = z["split"] == "heldout"
        self.x, self.y = z["features"][ho], z["route"][ho]
        self.one = self.x[:1]

    def time_decision_one_token(self, d):
        from agp.heads.controller import route_decisions
        route_decisions(self.ctl, self.calib, self.one)

    def peakmem_decision_one_token(self, d):
        from agp.heads.controller import route_decisions
        route_decisions(self.ctl, self.calib, self.one)

    def time_decision_heldout_batch(self, d):
        from agp.heads.controller import route_decisions
        route_decisions(self.ctl, self.calib, self.x)

    def _dec(self):
        from agp.heads.controller import route_decisions
        return route_decisions(self.ctl, self.calib, self.x)

    def track_route_macro_f1(self, d):
        from agp.calibrate.metrics import per_class
        from agp.oracle.labels import ROUTES
        return per_class(self.y, self._dec()["action"], ROUTES)["macro_f1"]

    track_route_macro_f1.unit = "macro-F1"

    def track_route_ece_calibrated(self, d):
        from agp.calibrate.metrics import ece
        return ece(self._dec()["probs"], self.y)

    track_route_ece_calibrated.unit = "ECE (15 bins)"

    def track_acceptance_at_gate(self, d):
        return float(1 - self._dec()["abstain"].mean())

    track_acceptance_at_gate.unit = "fraction"

    def track_macs_per_decision(self, d):
        return self.ctl.macs()

    track_macs_per_decision.unit = "MACs"
