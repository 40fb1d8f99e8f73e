"""Stage 5 transfer on a tiny Gemma: lossless resume past the sliding window, the typed refusals
of a resuming host, and the stage end to end through `agp run --stage transfer`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from agp.cli import main
from agp.ptp.errors import FingerprintMismatch, PTPError
from tests.conftest import run_tiny_stages


@pytest.fixture(scope="module")
def tiny_bb(tiny_model_dir):
    from agp.backbone import backbone
    return backbone.load(tiny_model_dir["gemma3_text"])


LONG = "the quick brown fox jumps over the lazy dog " * 2     # 89 tokens, the tiny window is 8


def test_f32_transfer_resumes_bit_for_bit_past_the_window(tiny_bb):
    from agp.transfer.measure import resume, teacher
    ids = tiny_bb.encode(LONG)
    t = teacher(tiny_bb, ids, [2], 6)
    r = resume(tiny_bb, 2, "f32", t)
    assert len(ids) > 8 * 4 and r.max_abs_logit_diff == 0.0 and r.continuation == t.continuation
    assert r.kl.max() == 0.0 and r.top1.all()


def test_a_lossy_codec_costs_fidelity_and_saves_bytes(tiny_bb):
    from agp.transfer.measure import resume, teacher
    t = teacher(tiny_bb, tiny_bb.encode(LONG), [2], 4)
    exact, tq2 = resume(tiny_bb, 2, "f32", t), resume(tiny_bb, 2, "tq2", t)
    assert tq2.span_bytes < exact.span_bytes / 8
    assert tq2.kl.mean() > 1e-3 and tq2.cosine < 0.999


def test_attention_sinks_travel_exactly_and_the_rest_with_the_codec(tiny_bb):
    """Positions past SINK_LIMIT (Gemma's BOS and a few later ones) go in f32 packets; the span
    around them with the codec; the resumer runs all the runs of a step in one pass."""
    from agp.transfer.resume import SINK_LIMIT, Resumer, Wire, receiver_for
    rng = np.random.default_rng(0)
    states = rng.normal(size=(12, tiny_bb.hidden_size)).astype(np.float32)
    states[0, 3] = states[7, 5] = 3 * SINK_LIMIT                 # beyond fp16: the codec alone would refuse
    runs = Wire(tiny_bb, 2, "fp16").packets(states, 0)
    assert [exact for _, exact in runs] == [True, False, True, False]
    logits, got = Resumer(tiny_bb, 2, receiver_for(tiny_bb)).accept(*[p for p, _ in runs])
    assert logits.shape[0] == 12 and got[0, 3] == states[0, 3] and got[7, 5] == states[7, 5]
    assert np.abs(got - states).max() < 1e-2


def _session(bb, layer=2):
    from agp.transfer.resume import Resumer, Sender, Wire, receiver_for
    ids = bb.encode(LONG)
    return ids, Sender(bb, layer), Wire(bb, layer, "fp16"), Resumer(bb, layer, receiver_for(bb))


def test_a_gap_or_a_replayed_span_is_refused_before_the_cache_moves(tiny_bb):
    from agp.transfer.resume import SpanGap
    ids, sender, wire, resumer = _session(tiny_bb)
    first = wire.packet(sender.states(ids[:10]), 0)
    resumer.accept(first)
    later = wire.packet(sender.states(ids[10:12]), 11)        # position 10 never sent
    with pytest.raises(SpanGap, match="a gap"):
        resumer.accept(later)
    offset = resumer.cache[2].offset
    again = wire.packet(sender.states(ids[12:13]), 0)          # back to the start
    with pytest.raises(SpanGap, match="duplicate or out of order"):
        resumer.accept(again)
    assert resumer.cache[2].offset == offset and resumer.next == 10


def test_a_state_for_another_boundary_or_model_is_refused(tiny_bb, tiny_model_dir, tmp_path):
    from agp.transfer.resume import Resumer, Sender, Wire, WrongBoundary, receiver_for
    ids, sender, _, resumer = _session(tiny_bb, 2)
    other_layer = Wire(tiny_bb, 3, "fp16").packet(Sender(tiny_bb, 3).states(ids[:4]), 0)
    with pytest.raises(WrongBoundary, match="block 3"):
        resumer.accept(other_layer)
    from agp.backbone import backbone
    from tests.tiny import make_tiny_model
    other = backbone.load(str(make_tiny_model("gemma3_text", tmp_path / "other", seed=1)))
    foreign = Wire(other, 2, "fp16").packet(Sender(other, 2).states(ids[:4]), 0)
    with pytest.raises(FingerprintMismatch):
        Resumer(tiny_bb, 2, receiver_for(tiny_bb)).accept(foreign)
    assert issubclass(WrongBoundary, PTPError)


@pytest.fixture(scope="module")
def tiny_transfer_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return run_tiny_stages(root, tiny_model_dir["gemma3_text"], ["baseline", "controller", "runtime", "transfer"],
                           {"runtime": ["--runtime-new-tokens", "4"]})


def test_transfer_stage_writes_the_dataset_the_table_and_the_decision(tiny_transfer_run):
    run = tiny_transfer_run
    m = run.stage("transfer")["metrics"]
    assert run.stage("transfer")["status"] == "done"
    assert m["f32_resume_exact"] is True and m["end_to_end"]["identical_to_in_process"] is True
    assert m["dataset"]["prompts_in_two_splits"] == 0
    long = {r["codec"]: r for r in m["long_span"]}
    assert long["f32"]["tokens"] == 60 and long["f32"]["max_abs_logit_diff"] == 0.0 and long["f32"]["continuation_identical"]
    shares = m["dataset"]["route_shares"]
    assert set(shares) == {"train", "valid", "heldout"}
    assert all(abs(sum(v for k, v in s.items() if k != "labelled") - 1) < 1e-6 for s in shares.values() if s["labelled"])
    raw = {r["codec"] for r in m["rate_distortion"] if not r["adapter"]}
    assert raw == {"f32", "fp16", "q8_0", "tq4"} and {r["layer"] for r in m["rate_distortion"]} == set(m["layers"])
    late = m["boundaries"]["late"]
    adapters = {r["codec"]: r for r in m["rate_distortion"] if r["adapter"]}
    assert set(adapters) == {f"ta{w}-{mode}/{codec}" for w, codec in ((8, "q8_0"), (40, "tq3"))
                             for mode in ("hidden", "fisher", "logit")}
    assert all(r["layer"] == late for r in adapters.values())
    # a code is fewer bytes than the raw state in fp16; each adapter row is compared with the raw codecs at its bytes
    fp16 = next(r for r in m["rate_distortion"] if r["codec"] == "fp16" and r["layer"] == late)
    assert all(r["bytes_per_token"] < fp16["bytes_per_token"] for r in adapters.values())
    assert m["adapters"]["fits"]["ta40-logit/tq3"]["init"] == "fisher"
    assert {v["adapter"] for v in m["equal_bytes"]} == set(adapters)
    codecs = raw | set(adapters)
    out = run.path / "transfer"
    for b in m["layers"]:
        path = out / f"dataset_L{b}.npz"
        with np.load(path) as z:
            assert z["states"].shape[0] == z["topk_ids"].shape[0] == sum(m["dataset"]["positions"].values())
            assert set(z["split"]) <= {"train", "valid", "heldout"}
        from agp import io
        assert m["dataset"]["sha256"][path.name] == io.sha256_file(path)
        assert (out / f"rate_distortion_L{b}.png").exists()
    assert m["decision"]["codec"] in codecs - {"f32"}
    for name in adapters:                                  # each adapter is saved beside the table
        assert (out / "adapters" / name.replace("/", "_") / "transfer_adapter.safetensors").exists()
    assert "Decision" in (out / "report.md").read_text()
    assert json.loads((out / "rate_distortion.json").read_text())["rows"] == m["rate_distortion"]


def test_an_unknown_codec_is_refused_before_any_model_work(tiny_transfer_run, tiny_model_dir, capsys):
    rc = main(["run", "--stage", "transfer", "--run-dir", str(tiny_transfer_run.path), "--model",
               tiny_model_dir["gemma3_text"], "--no-gates", "--transfer-codecs", "f32,zstd"])
    assert rc == 2 and "unknown codec 'zstd'" in capsys.readouterr().err


def test_transfer_boundaries_outside_the_model_are_refused(tiny_transfer_run, tiny_model_dir, capsys):
    rc = main(["run", "--stage", "transfer", "--run-dir", str(tiny_transfer_run.path), "--model",
               tiny_model_dir["gemma3_text"], "--no-gates", "--transfer-layers", "0,2"])
    assert rc == 2 and "must lie in 1.." in capsys.readouterr().err


def test_a_stage_gate_runs_only_that_stages_files(tiny_transfer_run):
    """runtime and transfer share the stage-5 marker: the runtime stage's gate must not run the
    transfer gate (whose stage has not run yet when the runtime gate runs in `agp run`)."""
    from agp.commands.run import gate_command
    runtime = " ".join(gate_command(tiny_transfer_run, "stage5", "runtime"))
    transfer = " ".join(gate_command(tiny_transfer_run, "stage5", "transfer"))
    assert "test_stage5_runtime.py" in runtime and "transfer" not in runtime.split("--agp-run")[0]
    assert "test_stage5_transfer.py" in transfer and "test_stage5_runtime.py" not in transfer
