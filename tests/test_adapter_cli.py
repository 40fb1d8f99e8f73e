"""Stage 1 end to end through `agp run` on a tiny model (real baseline stage, real mlx-lm training),
plus resume-after-interrupt and the adapter/base check."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agp import io
from agp.cli import main
from agp.errors import AGPError
from agp.runs import Run

FX = Path(__file__).resolve().parents[1] / "fixtures" / "transcripts"
ARGS = ["--no-gates", "--baseline-prompts", "1", "--baseline-decode-tokens", "2",
        "--adapter-iters", "4", "--adapter-blocks", "2", "--adapter-max-seq", "160", "--adapter-eval-rows", "4",
        "--adapter-checkpoint-every", "2"]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # stage by stage: `agp run` alone would go on to later stages (controller, ...) that are not this test's
    for stage in ("baseline", "adapter"):
        rc = main(["run", "--stage", stage, "--runs", str(root), "--model", tiny_model_dir["gemma3_text"], *ARGS])
        assert rc == 0, stage
    run_dir = (root / "latest").resolve()
    man = json.loads((run_dir / "manifest.json").read_text())
    recorded = man["stages"]["adapter"]["artifacts"]
    assert recorded["adapter_dir"] == "adapter/adapter", "artifacts are recorded relative to the run"
    run = Run(run_dir)
    man["stages"]["adapter"]["artifacts"] = {k: str(run.artifact("adapter", k)) for k in recorded}
    return run_dir, man


def test_run_baseline_then_adapter(tiny_run):
    run_dir, man = tiny_run
    assert man["stages"]["baseline"]["status"] == "done"
    rec = man["stages"]["adapter"]
    assert rec["status"] == "done" and rec["gate"]["outcome"] == "not run"
    m = rec["metrics"]
    adapter_dir = Path(rec["artifacts"]["adapter_dir"])
    assert adapter_dir == run_dir / "adapter" / "adapter"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert cfg["agp"]["blocks"] == [4, 5] and cfg["agp"]["steps"] == 4
    assert cfg["agp"]["base_fingerprint"] == man["stages"]["baseline"]["metrics"]["model"]["fingerprint"]
    assert len(m["train"]["history"]) == 4 and m["train"]["mlx_peak_memory_gb"] > 0
    for split in ("heldout", "control"):
        assert m["eval"][split]["tokens"] > 0 and m["eval"][split]["base_nll"] > 0
    # a random tiny model learns the corpus' byte statistics fast: the adapter must help
    assert m["eval"]["heldout"]["tuned_nll"] < m["eval"]["heldout"]["base_nll"]
    assert len(m["lens"]["tuned"]["kl_mean"]) == 6
    for lane in ("sft", "routing", "semantic", "transfer"):
        for split in ("train", "valid", "heldout"):
            p = run_dir / "adapter" / "data" / lane / f"{split}.jsonl"
            assert man["datasets"][f"adapter/data/{lane}/{split}.jsonl"] == io.sha256_file(p)
    assert (run_dir / "adapter" / "adapter.png").stat().st_size > 1000
    assert "Stage 1" in (run_dir / "report.md").read_text()


def test_adapter_loads_back_and_reproduces_eval(tiny_run, tiny_model_dir):
    from agp.backbone.backbone import load
    from agp.data.build import load_lane
    from agp.train import nll
    run_dir, man = tiny_run
    rec = man["stages"]["adapter"]
    m = rec["metrics"]
    bb = load.__wrapped__(tiny_model_dir["gemma3_text"], adapter=rec["artifacts"]["adapter_dir"])
    held = {r["id"]: r for r in load_lane(rec["artifacts"]["data_dir"], "sft", "heldout")}
    rows = [held[i] for i in m["eval_set"]["heldout_ids"]]
    again = nll.evaluate(bb, nll.encode_rows(bb, rows, m["eval_set"]["max_seq"]), m["eval_set"]["lens_positions"])
    assert again["nll"] == m["eval"]["heldout"]["tuned_nll"]


def test_adapter_for_another_base_is_refused(tiny_run, tiny_model_dir, tmp_path):
    from agp.backbone.backbone import load
    _, man = tiny_run
    with pytest.raises(AGPError, match="was trained on base model"):
        load.__wrapped__(tiny_model_dir["gemma4_text"], adapter=man["stages"]["adapter"]["artifacts"]["adapter_dir"])
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(AGPError, match="no adapter_config.json"):
        load.__wrapped__(tiny_model_dir["gemma3_text"], adapter=str(bare))


def test_interrupted_training_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    """Stop after the step-2 checkpoint, resume in a fresh model: same weights as an uninterrupted run."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from agp.backbone.backbone import load
    from agp.data.build import DataArgs, build, load_lane
    from agp.train import nll, tuner

    build(DataArgs(source=str(FX)), tmp_path / "d")
    rows = load_lane(tmp_path / "d", "sft", "train")

    def fresh(root):
        bb = load.__wrapped__(tiny_model_dir["gemma3_text"])
        mx.random.seed(0)
        tuner.attach(bb.model, "lora", 2, 4, 10.0, 0.0)
        (tmp_path / root).mkdir(exist_ok=True)
        return bb, tuner.Checkpoints(tmp_path / root, "ident")

    kw = dict(iters=4, batch_size=2, max_seq=160, learning_rate=1e-3, warmup=1, seed=0, every=2)
    bb, ck = fresh("full")
    tuner.fit(bb.model, nll.encode_rows(bb, rows, 160), ckpt=ck, **kw)
    want = dict(tree_flatten(bb.model.trainable_parameters()))

    class Interrupt(tuner.Checkpoints):
        def save(self, step, *a, **k):
            super().save(step, *a, **k)
            if step == 2:
                raise KeyboardInterrupt

    bb, _ = fresh("cut")
    with pytest.raises(KeyboardInterrupt):
        tuner.fit(bb.model, nll.encode_rows(bb, rows, 160), ckpt=Interrupt(tmp_path / "cut", "ident"), **kw)
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["step"] == 2
    bb, ck = fresh("cut")
    out = tuner.fit(bb.model, nll.encode_rows(bb, rows, 160), ckpt=ck, **kw)
    assert out["resumed_from"] == 2 and [h["step"] for h in out["history"]] == [1, 2, 3, 4]
    got = dict(tree_flatten(bb.model.trainable_parameters()))
    assert set(got) == set(want)
    for k in want:
        assert mx.allclose(got[k], want[k], atol=1e-6).item(), k
    # a checkpoint from other settings is ignored, never half-applied
    assert tuner.Checkpoints(tmp_path / "cut", "other").load() is None


def test_stage_with_a_missing_source_fails_cleanly_and_keeps_the_data(tiny_run, tiny_model_dir, tmp_path, capsys):
    run_dir, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = (copy / "adapter" / "data" / "manifest.json").read_text()
    rc = main(["run", "--stage", "adapter", "--run-dir", str(copy), "--model", tiny_model_dir["gemma3_text"],
               "--no-gates", "--source", str(tmp_path / "missing")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert (copy / "adapter" / "data" / "manifest.json").read_text() == before
    assert json.loads((copy / "manifest.json").read_text())["stages"]["adapter"]["status"] == "failed"


def test_nll_is_the_same_with_and_without_the_lens_pass(tiny_run, tiny_model_dir):
    """The gate may score without the lens (cheaper): both paths must give the same number."""
    from agp.backbone.backbone import load
    from agp.data.build import load_lane
    from agp.train import nll
    _, man = tiny_run
    rec = man["stages"]["adapter"]
    bb = load.__wrapped__(tiny_model_dir["gemma3_text"], adapter=rec["artifacts"]["adapter_dir"])
    rows = load_lane(rec["artifacts"]["data_dir"], "sft", "heldout")[:3]
    seqs = nll.encode_rows(bb, rows, 160)
    a, b = nll.evaluate(bb, seqs, 0), nll.evaluate(bb, seqs, 4)
    assert a["nll"] == b["nll"] and a["per_seq_nll"] == b["per_seq_nll"] and "lens" in b and "lens" not in a


def test_dora_adapter_saves_and_reloads(tiny_model_dir, tmp_path):
    import mlx.core as mx

    from agp.backbone.backbone import load
    from agp.data.build import DataArgs, build, load_lane
    from agp.train import nll, tuner

    build(DataArgs(source=str(FX)), tmp_path / "d")
    rows = load_lane(tmp_path / "d", "sft", "train")
    bb = load.__wrapped__(tiny_model_dir["gemma3_text"])
    mx.random.seed(0)
    cfg = tuner.attach(bb.model, "dora", 2, 4, 10.0, 0.0)
    seqs = nll.encode_rows(bb, rows, 160)
    (tmp_path / "ck").mkdir()
    tuner.fit(bb.model, seqs, iters=2, batch_size=2, max_seq=160, learning_rate=1e-3, warmup=0, seed=0,
              ckpt=tuner.Checkpoints(tmp_path / "ck", "x"), every=0)
    want = nll.evaluate(bb, seqs[:3])["nll"]
    tuner.save_adapter(tmp_path / "ad", bb.model, cfg, {"base_fingerprint": bb.fingerprint})
    again = load.__wrapped__(tiny_model_dir["gemma3_text"], adapter=str(tmp_path / "ad"))
    assert cfg["fine_tune_type"] == "dora"
    assert nll.evaluate(again, seqs[:3])["nll"] == want
