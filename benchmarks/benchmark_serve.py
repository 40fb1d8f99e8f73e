"""asv: the resume server on loopback — the round trip of an empty request and of a 4-draft verify
(time_, against a server thread in this process on the run's backbone), and the bytes per token
and tok/s ratios the run's serve stage recorded (track_). Reads a finished run with the serve stage
(env AGP_RUN, else runs/latest); without one the benchmarks are skipped (NotImplementedError: asv
reports them as not run)."""
import agp  # noqa: F401  (fast BLAS before mlx)
import json
import os
from pathlib import Path


def _run_dir() -> Path:
    p = Path(os.environ.get("AGP_RUN") or Path(os.environ.get("AGP_RUNS", "runs")) / "latest").resolve()
    if not (p / "serve" / "serve.json").exists():
        raise NotImplementedError(f"no finished serve stage at {p}; run `agp run` first")
    return p


def _row(m, layout, rtt=0.0):
    return next(r for r in m["layouts"]["rows"] if r["layout"] == layout and r["rtt_ms"] == rtt)


class RoundTrip:
    """One session on a loopback server: PING, and a verify of t0 + 4 drafts at the split."""
    timeout = 300

    def setup(self):
        from agp import runs
        from agp.serve.measure import boundary_state
        from agp.serve.remote import RemoteSplit
        from agp.serve.server import ResumeServer, ServeArgs, ServerThread
        from agp.train.serve import ServeStageArgs, setup
        run = runs.Run(_run_dir())
        m = json.loads((run.path / "serve" / "serve.json").read_text())
        su = setup(run, ServeStageArgs.from_dict(m["config"]))
        self.srv = ServerThread(ResumeServer(su.bb, su.split, ServeArgs(port=0))).start()
        self.link = RemoteSplit(su.bb, self.srv.address, su.split)
        self.span = boundary_state(su.bb, su.split, "def fibonacci(n):")[:5]

    def teardown(self):
        self.link.close()
        self.srv.stop()

    def time_empty_round_trip(self):
        from agp.serve import protocol as P
        self.link.client.call(P.Request(P.PING))

    def time_verify_4_drafts(self):
        from agp.serve import protocol as P
        self.link.reset()
        self.link.request(P.VERIFY, self.span, [1, 2, 3, 4])


class Recorded:
    """The serve stage's own figures for this commit."""

    def setup(self):
        self.m = json.loads((_run_dir() / "serve" / "serve.json").read_text())

    def track_bytes_up_per_token_speculative(self):
        return _row(self.m, "two-host speculative")["link"]["bytes_up_per_token"]
    track_bytes_up_per_token_speculative.unit = "bytes"

    def track_bytes_up_per_token_naive(self):
        return _row(self.m, "naive split")["link"]["bytes_up_per_token"]
    track_bytes_up_per_token_naive.unit = "bytes"

    def track_speculative_vs_naive_tok_s_at_max_rtt(self):
        return self.m["headline"]["speculative_vs_naive_at_max_rtt"]
    track_speculative_vs_naive_tok_s_at_max_rtt.unit = "ratio"

    def track_ping_p50_ms(self):
        return self.m["reliability"]["ping"]["p50_ms"]
    track_ping_p50_ms.unit = "ms"
