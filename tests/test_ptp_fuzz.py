"""The fuzz harness in miniature (980 inputs; the full 60 000-input run is `agp bench ptp-fuzz`)."""
from agp.bench.ptp_fuzz import FuzzArgs, MUTATIONS, format_report, run_fuzz


def test_fuzz_campaign_accepts_nothing_wrongly():
    res = run_fuzz(FuzzArgs(n=980, seed=123, max_ms=200, progress=False))
    assert res["crashed"] == 0 and res["accepted_wrongly"] == 0 and res["slow"] == 0, format_report(res)
    assert res["tried"] >= 980
    # every mutation kind was exercised and (almost all) rejected
    for m in MUTATIONS:
        c = res["per_mutation"][m]
        assert c.get("rejected", 0) > 0, m
        assert c.get("other-reason", 0) == 0, (m, c)
    assert res["replay"]["wrong"] == 0
    assert res["memory"]["peak_alloc_bytes"] < 256 * 1024
