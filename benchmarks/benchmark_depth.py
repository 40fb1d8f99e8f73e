"""Depth-routing module: forward time with the module against the plain exit decode (time_), and
KL to full depth / top-1 agreement per candidate block as the depth stage measured them (track_).

Reads the depth stage of a finished run (env AGP_RUN, else runs/latest); without one the
benchmarks are skipped (asv reports them as not run). Compare time_revive_token with
time_plain_remaining_layers in the same asv run: the ratio is the result.
"""
import agp  # noqa: F401  (fast BLAS before mlx)
import os
from pathlib import Path


def _run():
    from agp import runs
    p = Path(os.environ.get("AGP_RUN") or Path(os.environ.get("AGP_RUNS", "runs")) / "latest").resolve()
    if not (p / "depth" / "revive" / "revive.json").exists():
        raise NotImplementedError(f"no finished depth stage at {p}; run `agp run` first")
    return runs.Run(p)


def _row(path, layer, variant):
    from agp import runs
    rows = runs.Run(path).stage("depth")["metrics"]["ablation"]
    return next(r for r in rows if r["layer"] == int(layer) and r["variant"] == variant)


class Depth:
    timeout = 300
    number = 5
    repeat = 3

    def setup_cache(self):
        return str(_run().path)

    def setup(self, path):
        import mlx.core as mx
        import numpy as np
        from agp import runs
        from agp.backbone import load
        from agp.runtime import heads as H
        from agp.runtime.revive import Reviver
        run = runs.Run(path)
        self.bb = load(None, adapter=H.backbone_source(run).get("adapter_dir"))
        self.rv = Reviver.load(self.bb, run.path / "depth" / "revive")
        z = np.load(run.path / "depth" / "identity_sample.npz")
        self.states = {int(k[1:]): mx.array(z[k][:1][None]) for k in z.files}
        self.D = self.rv.layer

    def time_revive_token(self, path):
        self.rv.token(self.states)

    def time_plain_remaining_layers(self, path):
        import mlx.core as mx
        h = self.bb.run_layers(self.states[self.D], self.D, self.bb.n_layers)
        mx.eval(self.bb.head(h))


class DepthQuality:
    def setup_cache(self):
        return str(_run().path)

    def track_kl_module_translator_at_d(self, path):
        from agp import runs
        d = runs.Run(path).stage("depth")["metrics"]["decision_layer"]
        return _row(path, d, "module + translator")["kl"]

    track_kl_module_translator_at_d.unit = "nats"

    def track_kl_tuned_lens_at_d(self, path):
        from agp import runs
        d = runs.Run(path).stage("depth")["metrics"]["decision_layer"]
        return _row(path, d, "tuned lens")["kl"]

    track_kl_tuned_lens_at_d.unit = "nats"

    def track_top1_module_translator_per_layer(self, path, *_):
        from agp import runs
        m = runs.Run(path).stage("depth")["metrics"]
        return sum(_row(path, x, "module + translator")["top1"] for x in m["layers"]) / len(m["layers"])

    track_top1_module_translator_per_layer.unit = "mean top-1 agreement over candidate blocks"

    def track_revive_rescued_share(self, path):
        from agp import runs
        return runs.Run(path).stage("depth")["metrics"]["headline"]["revive_rescued_share"]

    track_revive_rescued_share.unit = "fraction of unacceptable positions"
