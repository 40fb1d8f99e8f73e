"""Stage 5 gate, transfer part: an exact codec resumes the model bit for bit from transferred
states (re-measured here), fp16 and the chosen configuration stay within their measured bounds,
the dataset is what the manifest says, the saved transfer adapters resume as the table recorded,
they beat the raw codecs where the curve says so, and the decision follows from the recorded curve.
The issue's goal (top-1 >= 0.99, KL <= 0.05 at <= 128 B per state at the late boundary) is an
xfail until a configuration reaches it: neither raw codecs nor the adapters do (docs/transfer.md)."""
from __future__ import annotations

import numpy as np
import pytest

from gates import thresholds as T
from gates.conftest import stage_record

pytestmark = pytest.mark.stage5


@pytest.fixture(scope="module")
def rec(agp_run):
    return stage_record(agp_run, "transfer")


@pytest.fixture(scope="module")
def rows(rec):
    return {(r["layer"], r["codec"]): r for r in rec["metrics"]["rate_distortion"]}


@pytest.fixture(scope="module")
def held_span(agp_run, rec):
    """The backbone and the first held-out span of the stage, with its full-depth teacher at B."""
    from agp.train.transfer import TransferArgs, inputs
    from agp.transfer.measure import teacher
    cfg = TransferArgs.from_dict(rec["metrics"]["config"])
    inp = inputs(agp_run, cfg)
    ids = inp.bb.encode(inp.rows["heldout"][0]["text"], max_tokens=cfg.max_tokens, truncate=True)
    return inp, cfg, teacher(inp.bb, ids, [inp.late], cfg.continuation)


def test_f32_transfer_resumes_bit_for_bit(rec, rows, held_span):
    from agp.transfer.measure import resume
    inp, cfg, t = held_span
    again = resume(inp.bb, inp.late, "f32", t)
    assert again.max_abs_logit_diff == 0.0 and again.continuation == t.continuation, "resume is not exact"
    assert rec["metrics"]["f32_resume_exact"]
    for layer in rec["metrics"]["layers"]:
        assert rows[layer, "f32"]["max_abs_logit_diff"] == 0.0, f"boundary {layer}: f32 resume not exact"


def test_f32_resumes_bit_for_bit_past_the_sliding_window(rec):
    long = {r["codec"]: r for r in rec["metrics"]["long_span"]}
    assert "f32" in long and long["f32"]["tokens"] > T.STAGE5_LONG_PROMPT_MIN_TOKENS, "no span past the window"
    assert long["f32"]["max_abs_logit_diff"] == 0.0 and long["f32"]["continuation_identical"], long["f32"]


def test_fp16_resumes_within_rounding(rec, rows):
    for layer in rec["metrics"]["layers"]:
        r = rows[layer, "fp16"]
        assert r["kl"] <= T.STAGE5_FP16_KL_MAX and r["top1"] >= T.STAGE5_FP16_TOP1_MIN, (layer, r["kl"], r["top1"])


@pytest.fixture(scope="module")
def fitted(agp_run, held_span):
    from agp.train.transfer import load_fitted
    return load_fitted(agp_run, held_span[0].bb)


def test_the_chosen_configuration_holds_when_remeasured(rec, held_span, fitted):
    from agp.transfer.measure import resume
    inp, cfg, t = held_span
    d = rec["metrics"]["decision"]
    codec, adapter = fitted.wire(d["codec"])
    again = resume(inp.bb, d["layer"], codec, t, cfg.seed, adapter=adapter)
    assert again.top1.mean() >= T.STAGE5_CHOSEN_TOP1_MIN and again.kl.mean() <= T.STAGE5_CHOSEN_KL_MAX, \
        (d["codec"], float(again.top1.mean()), float(again.kl.mean()))
    assert rec["metrics"]["end_to_end"]["identical_to_in_process"], "packets over the socket resumed differently"


def test_the_decision_follows_from_the_recorded_curve(rec):
    from agp.train.transfer import Table, decide, equal_bytes
    m = rec["metrics"]
    versus = equal_bytes(m["rate_distortion"], m["decision"]["equal_bytes_tolerance"])
    assert versus == m["equal_bytes"], "the equal-bytes comparison differs from the recorded one"
    choice = decide(Table(m["rate_distortion"], m["by_route"]), m["boundaries"]["late"], versus)
    assert (choice.layer, choice.codec) == (m["decision"]["layer"], m["decision"]["codec"])
    assert sorted(v["adapter"] for v in versus if v["beats_raw"]) == m["decision"]["adapters_on_critical_path"]


def test_the_saved_adapters_resume_as_the_table_recorded(rec, rows, held_span, fitted):
    """Each adapter file, reloaded, gives the first held-out span's KL the stage measured: the
    table describes the adapters on disk, not a model that only lived in the stage's process."""
    from agp.transfer.measure import resume
    inp, cfg, t = held_span
    assert set(fitted.adapters) == {r["codec"] for r in rec["metrics"]["rate_distortion"] if r["adapter"]}
    assert fitted.adapters, "the stage trained no transfer adapter"
    for name, a in fitted.adapters.items():
        if a.layer != inp.late:
            continue
        again = resume(inp.bb, a.layer, a.codec, t, cfg.seed, adapter=a)
        assert again.kl.mean() == pytest.approx(rows[a.layer, name]["first_prompt_kl"], rel=1e-4, abs=1e-7), name


def test_an_adapter_beats_the_raw_codecs_below_8_bits(rec, rows):
    """Where the raw codecs fall apart (TurboQuant 4-bit resumes with KL ~3), the adapter of the same
    bytes must do far better, and the narrowest adapter must hold its measured quality."""
    late = rec["metrics"]["boundaries"]["late"]
    versus = [v for v in rec["metrics"]["equal_bytes"] if v["layer"] == late]
    assert any(v["beats_raw"] and not v["raw_is_larger"] for v in versus), versus
    small = rec["metrics"]["decision"]["within_goal_bytes"]
    assert small is not None and small["kl"] <= T.STAGE5_ADAPTER_GOAL_BYTES_KL_MAX \
        and small["top1"] >= T.STAGE5_ADAPTER_GOAL_BYTES_TOP1_MIN, small


def test_the_dataset_is_what_the_manifest_says(agp_run, rec):
    from agp import io
    m = rec["metrics"]
    assert m["dataset"]["prompts_in_two_splits"] == 0, "a prompt is in two splits"
    total = sum(m["dataset"]["positions"].values())
    for layer in m["layers"]:
        path = agp_run.path / "transfer" / f"dataset_L{layer}.npz"
        assert io.sha256_file(path) == m["dataset"]["sha256"][path.name], f"{path.name} changed since the stage"
        with np.load(path) as z:
            assert len(z["states"]) == total and np.isfinite(z["states"]).all()
            assert {"accept_local", "escalate"} <= set(z["route"][z["split"] == "heldout"]), "route classes missing"


@pytest.mark.xfail(reason="goal not reached: no raw codec fits 128 B per state (tq2 is 166 B and resumes with "
                          "KL ~30 at B), and the best learned transfer adapter that fits (the Fisher code, 256 values "
                          "in tq3, ~102 B) resumes with KL ~0.21, top-1 ~0.80 at CI size (docs/transfer.md)", strict=False)
def test_goal_top1_099_kl_005_at_128_bytes(rows, rec):
    late = rec["metrics"]["boundaries"]["late"]
    fits = [r for (layer, _), r in rows.items() if layer == late and r["bytes_per_token"] <= 128]
    assert any(r["top1"] >= 0.99 and r["kl"] <= 0.05 for r in fits), \
        [(r["codec"], r["bytes_per_token"], r["top1"], r["kl"]) for r in fits]
