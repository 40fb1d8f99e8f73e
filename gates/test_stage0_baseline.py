"""Stage 0 gate: the baseline run is faithful (parity, lens at the last layer) and complete."""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from agp.backbone import load
from agp.train.baseline import BaselineArgs, split_layer_map
from gates import thresholds as T
from gates.conftest import stage_record

pytestmark = pytest.mark.stage0


@pytest.fixture(scope="module")
def rec(agp_run):
    return stage_record(agp_run, "baseline")


def test_segmented_forward_matches_mlx_lm(rec):
    par = rec["metrics"]["parity"]
    assert par["prefill_max_abs_diff"] <= T.STAGE0_PARITY_MAX_ABS
    assert par["decode_max_abs_diff"] <= T.STAGE0_PARITY_MAX_ABS
    assert par["decode_steps"] >= 1


def test_lens_profile_is_sane(rec):
    pl = rec["metrics"]["per_layer"]
    n = rec["metrics"]["model"]["n_layers"]
    assert pl["layers"][-1] == n
    assert pl["kl_mean"][-1] <= T.STAGE0_FINAL_LAYER_KL_MAX
    assert pl["top1_agree"][-1] == 1.0
    assert pl["kl_mean"][0] >= T.STAGE0_FIRST_LAYER_KL_MIN
    assert pl["top1_agree"][-2] >= T.STAGE0_PENULTIMATE_AGREE_MIN


def test_split_map_follows_documented_rule(rec, agp_run):
    m = rec["metrics"]
    cfg = BaselineArgs.from_dict(m["config"])
    pl = m["per_layer"]
    again = split_layer_map(np.asarray(pl["top1_agree"]), np.asarray(pl["kl_mean"]), pl["layers"],
                            m["model"]["n_layers"], cfg)
    assert again["candidates"] == m["split_map"]["candidates"]
    assert m["split_map"]["candidates"], "no candidate split layer: the rule found no usable layer"
    assert all(0 < c < m["model"]["n_layers"] for c in m["split_map"]["candidates"])
    data = np.load(agp_run.path / "baseline" / "sufficiency.npz")
    assert np.allclose(data["kl"].mean(1), pl["kl_mean"], atol=1e-5)


def test_latency_memory_and_macs_recorded(rec):
    m = rec["metrics"]
    lat = m["latency"]
    for k in ("prefill_s", "decode_s"):
        assert 0 < lat[k]["p50"] <= lat[k]["p95"] and math.isfinite(lat[k]["p95"])
    assert lat["decode_tok_per_s"] > 0 and lat["mlx_peak_memory_mb"] > 0 and lat["rss_peak_mb"] > 0
    c = m["macs_per_token"]
    assert len(c["layers"]) == m["model"]["n_layers"] and c["head"] > 0
    assert abs(c["head_share"] + c["layers_share"] - 1) < 1e-9


def test_manifest_is_reproducible(agp_run, rec):
    man = agp_run.manifest
    for key in ("run_id", "git_commit", "platform", "reproduce"):
        assert key in man
    assert man["platform"]["blas"]["blas"]
    assert man["fingerprints"]["model"] == rec["metrics"]["model"]["fingerprint"]
    from agp import io
    assert man["datasets"]["baseline/prompts.jsonl"] == io.sha256_file(agp_run.path / "baseline" / "prompts.jsonl")
    assert (agp_run.path / "baseline" / "sufficiency.png").stat().st_size > 0
    assert (agp_run.path / "report.md").exists()


def test_real_model_knows_paris(rec):
    """Factual recall through the segmented path of the model the run used."""
    model = rec["metrics"]["model"]
    bb = load(model.get("arg"))
    if bb.vocab_size < 1000:
        pytest.skip("run used a tiny random model; factual recall needs real weights")
    paris = bb.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    for prompt in ("Question: What is the capital of France?\nAnswer:",
                   "The capital of Germany is Berlin. The capital of France is"):
        logits = bb.forward(mx.array([bb.encode(prompt)]))
        assert int(mx.argmax(logits[0, -1]).item()) == paris, prompt
    bare = bb.forward(mx.array([bb.encode("The capital of France is")]))[0, -1]
    rank = int((bare > bare[paris]).sum().item()) + 1
    assert rank <= T.STAGE0_PARIS_BARE_MAX_RANK
