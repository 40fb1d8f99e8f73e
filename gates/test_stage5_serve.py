"""Stage 5 gate, two-host part: lossless two-host decoding equals full depth token for token on
every prompt (one past the sliding window) at every emulated round trip, and crosses the link once
per round; the naive split over AGP-PTP (f32) and over mx.distributed equal full depth too; the
reliability figures are within their bounds; one two-host round is re-run here against a fresh
server. The issue's speed goals (ping p50 <= 1 ms on loopback; two-host speculative beats the
naive split above Thunderbolt's round trip) are checked against the recorded table."""
from __future__ import annotations

import pytest

from gates import thresholds as T
from gates.conftest import stage_record

pytestmark = pytest.mark.stage5


@pytest.fixture(scope="module")
def m(agp_run):
    return stage_record(agp_run, "serve")["metrics"]


def rows(m, layout):
    return [r for r in m["layouts"]["rows"] if r["layout"] == layout]


def test_two_host_lossless_equals_full_at_every_round_trip(m):
    assert m["layouts"]["codec"] == "f32"
    spec = rows(m, "two-host speculative")
    assert {r["rtt_ms"] for r in spec} == set(m["config"]["rtts_ms"]), "a round trip is missing"
    assert all(r["equal_full"] for r in spec), [(r["rtt_ms"], r["equal_full"]) for r in spec]
    assert max(m["prompt_tokens"]) >= T.STAGE5_LONG_PROMPT_MIN_TOKENS, "no prompt past the sliding window"


def test_two_host_lossless_crosses_once_per_round(m):
    for r in rows(m, "two-host speculative"):
        assert r["link"]["round_trips"] == r["rounds"], r["link"]
        assert r["link"]["prefill"]["round_trips"] == m["layouts"]["prompts"], r["link"]["prefill"]  # one chunk each
        assert r["rounds"] < r["tokens"], "no round emitted more than one token"


def test_two_host_routed_equals_single_host_routed(m):
    """Lossy, but the same tokens as the one-host routed mode, crossing only for deeper tokens."""
    routed = rows(m, "two-host routed")
    if not routed:
        pytest.skip(f"no two-host routed row: the split {m['split']} is not the run's late boundary "
                    "(the lossy two-host mode splits there)")
    for r in routed:
        assert r["equal_single_host"], (r["rtt_ms"], r["agreement_full"])
        assert r["link"]["round_trips"] < r["tokens"], r["link"]


def test_the_naive_splits_equal_full(m):
    assert all(r["equal_full"] for r in rows(m, "naive split"))
    if m["config"]["ring"]:
        assert m["ring"]["equal_full"], "the mx.distributed split differs from full depth"


def test_reliability_within_bounds(m):
    rel = m["reliability"]
    c = rel["concurrency"]
    assert c["lost"] == c["unsent"] == c["duplicated"] == c["misrouted"] == c["wrong_tokens"] == c["errors"] == 0, c
    assert rel["restart"]["equal_full"] and rel["restart"]["resyncs"] >= 1, rel["restart"]
    for name, b in rel["bad_frames"].items():
        assert b["reason"] == b["expected"] and b["closed"] and b["others_served"], (name, b)
    s = rel["sessions"]
    assert s["held_after"] == 0 and s["rss_growth_mb"] <= T.STAGE5_SERVE_SESSIONS_RSS_MB, s


def test_a_two_host_round_is_lossless_when_rerun(agp_run, m):
    """Re-measured: the first prompt through a fresh server equals full depth."""
    from agp.serve.measure import generate
    from agp.serve.remote import RemoteSplit, remote_decoder
    from agp.serve.server import ResumeServer, ServeArgs, ServerThread
    from agp.train.serve import ServeStageArgs, setup
    cfg = ServeStageArgs.from_dict(m["config"])
    su = setup(agp_run, cfg)
    su.prompts = su.prompts[:1]
    full, _ = generate(su, "full")
    with ServerThread(ResumeServer(su.bb, su.split, ServeArgs(port=0))) as srv:
        got, row = generate(su, "speculative", remote_decoder("speculative", RemoteSplit(su.bb, srv.address, su.split)))
    assert got == full and row["rounds"] < row["tokens"]


def test_loopback_round_trip_goal(m):
    assert m["reliability"]["ping"]["p50_ms"] <= T.STAGE5_SERVE_PING_P50_MS, m["reliability"]["ping"]


def test_two_host_speculative_beats_the_naive_split_above_thunderbolt(m):
    spec = {r["rtt_ms"]: r["tok_s"] for r in rows(m, "two-host speculative")}
    naive = {r["rtt_ms"]: r["tok_s"] for r in rows(m, "naive split")}
    slower = {rtt: round(spec[rtt] / naive[rtt], 3) for rtt in spec if rtt > T.STAGE5_SERVE_THUNDERBOLT_RTT_MS
              and spec[rtt] < naive[rtt] * (1 - T.STAGE5_SERVE_TOK_S_NOISE)}
    assert not slower, f"two-host speculative / naive split tok/s at these round trips: {slower}"
