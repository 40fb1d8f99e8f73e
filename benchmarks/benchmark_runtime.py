"""Runtime modes: decode time for 32 tokens per mode (time_), and speculative acceptance, cost
ratios and lossy-mode agreement (track_) on one held-out prompt.

Reads the runtime stage of a finished run (env AGP_RUN, else runs/latest): its backbone, exit
heads and controller. Without one the benchmarks are skipped (asv reports them as not run).
Compare time_speculative with time_mlx_lm_generate in the same asv run: the ratio is the result.
"""
import agp  # noqa: F401  (fast BLAS before mlx)
import os
from pathlib import Path

NEW_TOKENS = 32


def _run():
    from agp import runs
    p = Path(os.environ.get("AGP_RUN") or Path(os.environ.get("AGP_RUNS", "runs")) / "latest").resolve()
    if not (p / "runtime" / "runtime.json").exists():
        raise NotImplementedError(f"no finished runtime stage at {p}; run `agp run` first")
    return runs.Run(p)


class Runtime:
    timeout = 600
    number = 1
    repeat = 3

    def setup_cache(self):
        return str(_run().path)

    def setup(self, path):
        from agp import runs
        from agp.backbone import load
        from agp.runtime import heads as H
        from agp.train import runtime as R
        run = runs.Run(path)
        meta = H.backbone_source(run)
        self.bb = load(None, adapter=meta.get("adapter_dir"))
        self.heads = H.load(run, self.bb, "routed" if run.stage("controller").get("status") == "done" else "speculative")
        cfg = R.RuntimeArgs(bench_prompts=1)
        self.ids = R.bench_prompts(self.bb, R.source_rows(run), cfg)[0][1]
        self.meta = meta

    def _gen(self, mode, **kw):
        from agp.runtime.measure import run_mode
        from agp.runtime import GenerateArgs
        return run_mode(self.bb, mode, self.heads, self.ids, NEW_TOKENS, "asv", GenerateArgs(**kw))

    def time_mlx_lm_generate(self, path):
        from agp.runtime.measure import run_anchor
        run_anchor(self.bb, self.ids, NEW_TOKENS, "asv")

    def time_full(self, path):
        self._gen("full")

    def time_speculative(self, path):
        self._gen("speculative", draft_max=self.meta["draft_max"], draft_min_confidence=self.meta["draft_min_confidence"])

    def time_speculative_feature(self, path):
        """The EAGLE-style feature draft (runs with it only; older runs have none)."""
        d = (self.meta.get("drafts") or {}).get("feature")
        if d is None or self.heads.feature is None:
            raise NotImplementedError("this run has no feature draft head")   # asv: skipped
        self._gen("speculative:feature", draft_max=d["draft_max"], draft_min_confidence=d["draft_min_confidence"])

    def time_exit_draft_layer(self, path):
        self._gen(f"exit:{self.meta['draft_layer']}")

    def time_entropy(self, path):
        self._gen("entropy")

    def time_routed(self, path):
        if self.heads.controller is None:
            raise NotImplementedError("no controller in this run")
        self._gen("routed")

    def _spec(self):
        return self._gen("speculative", draft_max=self.meta["draft_max"],
                         draft_min_confidence=self.meta["draft_min_confidence"]).summary

    def track_speculative_acceptance(self, path):
        return self._spec()["acceptance"]

    track_speculative_acceptance.unit = "fraction"

    def track_speculative_mac_ratio(self, path):
        return self._spec()["mac_ratio_vs_full"]

    track_speculative_mac_ratio.unit = "MACs / full depth"

    def track_speculative_read_ratio(self, path):
        return self._spec()["read_ratio_vs_full"]

    track_speculative_read_ratio.unit = "weight reads / full depth"

    def track_routed_agreement(self, path):
        from agp.runtime.measure import agreement
        if self.heads.controller is None:
            raise NotImplementedError("no controller in this run")
        return agreement(self._gen("routed").tokens, self._gen("full").tokens)["agreement"]

    track_routed_agreement.unit = "token agreement with full depth"

    def track_routed_mac_ratio(self, path):
        if self.heads.controller is None:
            raise NotImplementedError("no controller in this run")
        return self._gen("routed").summary["mac_ratio_vs_full"]

    track_routed_mac_ratio.unit = "MACs / full depth"
