"""Stage 2 end to end through the CLI on a tiny model (baseline + controller), and its bad inputs."""
from __future__ import annotations

import json

import pytest

from agp.cli import main
from agp.io import sha256_file, write_json
from agp.runs import Run
from tests.conftest import run_tiny_stages


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model = tiny_model_dir["gemma3_text"]
    return run_tiny_stages(root, model, ["baseline", "controller"]), root, model


def test_controller_stage_writes_everything(tiny_run):
    run, _, _ = tiny_run
    rec = run.stage("controller")
    assert rec["status"] == "done" and rec["seconds"] > 0
    m = rec["metrics"]
    assert m["backbone"] == "base" and m["prompt_source"] == "baseline/prompts.jsonl" and m["resplit_60_20_20"]
    assert m["layers"]["decision"] in m["layers"]["probe"] and m["layers"]["exits"][-1] == 6
    assert m["controller"]["macs_per_decision"] <= m["controller"]["layer_macs"]
    for name in ("majority", "entropy-only", "softmax-confidence (CALM)", "hidden-saturation (CALM)",
                 "fixed-layer (exit at D)"):
        b = m["baselines"][name]
        assert 0 <= b["heldout"]["macro_f1"] <= 1 and b["ece_before"] is not None
    ceil = m["controller"]["information_ceiling"]
    assert 0 <= ceil["route_argmax"]["macro_f1"] <= 1
    fr = m["controller"]["recall_frontier_heldout"]
    assert (run.path / "controller" / "safety_frontier.png").exists() == bool(fr["points"])
    assert set(m["controller"]["variants"]) == {"route", "route+vitality", "route+vitality+earliest"}
    shares = m["labels"]["route_shares"]["train"]
    assert abs(sum(shares.values()) - 1) < 1e-9 and min(shares.values()) > 0
    d = run.path / "controller"
    for f in ("oracle.npz", "sweep.json", "decisions.jsonl", "features.npz", "translators.npz", "reliability.png",
              "gate_sweep.png", "savings.png", "heads/heads.safetensors", "heads/calibration.json"):
        assert (d / f).stat().st_size > 0, f
    assert run.manifest["datasets"]["controller/oracle.npz"] == sha256_file(d / "oracle.npz")
    recs = [json.loads(x) for x in (d / "decisions.jsonl").read_text().splitlines()]
    assert len(recs) == m["dataset"]["positions"]["heldout"]
    assert {"action", "confidence", "abstain", "vitality", "earliest_layer", "label"} <= set(recs[0])
    assert "Stage 2" in (run.path / "report.md").read_text()


def test_saved_heads_reload(tiny_run):
    from agp.heads.controller import Controller
    run, _, _ = tiny_run
    ctl = Controller.load(run.path / "controller" / "heads")
    assert ctl.macs() == run.stage("controller")["metrics"]["controller"]["macs_per_decision"]


def test_stage_records_oracle_speed_and_leave_one_source_out(tiny_run):
    run, _, _ = tiny_run
    m = run.stage("controller")["metrics"]
    speed = m["oracle_speed"]
    assert speed["positions"] == sum(m["dataset"]["positions"].values())
    assert speed["probe_positions_per_s"] > 0 and speed["bound_positions_per_s"] > 0
    left_out = m["leave_one_source_out"]
    assert left_out, "no source was left out"
    for name, r in left_out.items():
        if "skipped" not in r:
            assert 0 <= r["left_out"]["macro_f1"] <= 1 and r["positions"] >= 40


def _prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_controller_on_my_prompts(tiny_run, tmp_path, capsys):
    """`agp eval controller` labels new prompts with the run's settings and prints the table."""
    run, _, model = tiny_run
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}  # a small helper number {i}\n" * 3 for i in range(12)]
    prompts = _prompts(tmp_path / "mine.jsonl", [{"text": t, "source": "code"} for t in texts])
    out = tmp_path / "eval.json"
    assert main(["eval", "controller", "--run", str(run.path), "--prompts", prompts, "--model", model,
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "your prompts" in printed and "run's held-out split" in printed
    result = json.loads(out.read_text())
    yours = result["yours"]
    assert yours["prompts"] == 12 and yours["positions"] >= 20
    assert abs(sum(yours["route_shares"].values()) - 1) < 1e-9
    assert result["label_rule"] == json.loads((run.path / "controller" / "sweep.json").read_text())["chosen"]


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("not json\n", "invalid JSON"),
    ('{"id": 1}\n', 'has no "text" string'),
    ("", "holds no prompts"),
    ('{"text": "hi"}\n', "positions to label"),
])
def test_eval_controller_bad_prompts_are_one_line(tiny_run, tmp_path, capsys, content, message):
    run, _, model = tiny_run
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["eval", "controller", "--run", str(run.path), "--prompts", str(path), "--model", model]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "agp:" in line]   # progress bars aside
    assert len(err) == 1 and message in err[0], err


def test_eval_controller_needs_the_stage(tiny_model_dir, tmp_path, capsys):
    root = tmp_path / "runs"
    model = tiny_model_dir["gemma3_text"]
    assert main(["run", "--stage", "baseline", "--runs", str(root), "--model", model, "--no-gates",
                 "--baseline-prompts", "2", "--baseline-decode-tokens", "2"]) == 0
    prompts = _prompts(tmp_path / "p.jsonl", [{"text": "x = 1\n" * 20}])
    assert main(["eval", "controller", "--run", str((root / "latest").resolve()), "--prompts", prompts]) == 2
    err = capsys.readouterr().err
    assert "controller" in err and "agp run" in err


def test_stage2_gate_fails_on_a_random_model(tiny_run):
    """The gate must be able to fail: a random tiny model's controller cannot beat its baselines
    by the measured margins, and the outcome says so."""
    from agp.commands.run import run_gate
    run, _, _ = tiny_run                  # runs before the tests below mark the stage failed
    out = run_gate(run, "stage2")
    assert out["outcome"] == "failed" and "failed" in out["summary"], out


def test_adapter_recorded_but_missing_is_a_clear_error(tiny_run, capsys):
    run, root, model = tiny_run
    man = json.loads((run.path / "manifest.json").read_text())
    man["stages"]["adapter"] = {"status": "done", "artifacts": {"adapter_dir": str(run.path / "nope")}}
    write_json(run.path / "manifest.json", man)
    try:
        rc = main(["run", "--stage", "controller", "--run-dir", str(run.path), "--model", model, "--no-gates"])
        assert rc == 2 and "adapter_dir" in capsys.readouterr().err
    finally:
        del man["stages"]["adapter"]
        write_json(run.path / "manifest.json", man)


def test_bad_layer_flag_is_a_clear_error(tiny_run, capsys):
    run, _, model = tiny_run
    rc = main(["run", "--stage", "controller", "--run-dir", str(run.path), "--model", model, "--no-gates",
               "--controller-layers", "1,2"])
    assert rc == 2 and "decision layer 4" in capsys.readouterr().err
    rc = main(["run", "--stage", "controller", "--run-dir", str(run.path), "--model", model, "--no-gates",
               "--controller-decision-layer", "1"])
    assert rc == 2 and "decision layer 1 is not among the probe layers" in capsys.readouterr().err



def _real_lora_adapter(model_dir, dest):
    """A genuine mlx-lm LoRA adapter directory for the tiny model (random LoRA factors, so the tuned
    backbone differs from the base one), in the format stage 1 writes."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(model_dir)
    cfg = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, cfg)
    mx.random.seed(3)
    ad = {k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(model.trainable_parameters())
          if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    dest.mkdir(parents=True)
    mx.save_safetensors(str(dest / "adapters.safetensors"), ad)
    write_json(dest / "adapter_config.json", {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": cfg})


def test_adapter_stage_switches_backbone_and_prompts(tiny_model_dir, tmp_path):
    """With a finished adapter stage the controller uses the tuned backbone and the routing lane."""
    import shutil
    from agp.data.prompt_pack import PromptPackArgs, build_prompt_pack
    from agp.io import write_jsonl
    model = tiny_model_dir["gemma3_text"]
    root = tmp_path / "runs"
    assert main(["run", "--stage", "baseline", "--runs", str(root), "--model", model, "--no-gates",
                 "--baseline-prompts", "1", "--baseline-decode-tokens", "1"]) == 0
    run = Run((root / "latest").resolve())
    adir = run.path / "adapter" / "lora"
    _real_lora_adapter(model, adir)
    rows = build_prompt_pack(PromptPackArgs(per_source=6))
    for s in ("train", "valid", "heldout"):
        write_jsonl(run.path / "adapter" / "data" / "routing" / f"{s}.jsonl", [r for r in rows if r["split"] == s])
    run.update_stage("adapter", status="done", artifacts={"adapter_dir": str(adir)})
    assert main(["run", "--stage", "controller", "--run-dir", str(run.path), "--model", model, "--no-gates",
                 "--controller-prompts", "18", "--controller-steps", "20"]) == 0
    m = Run(run.path).stage("controller")["metrics"]
    assert m["backbone"] == "adapter" and m["adapter_dir"] == str(adir)
    assert m["prompt_source"] == "adapter/data/routing" and m["prompts_topped_up"] == 0
    from agp.backbone import load
    assert m["model_fingerprint"] == load(model, adapter=str(adir)).fingerprint != load(model).fingerprint
    shutil.rmtree(adir)
    assert main(["run", "--stage", "controller", "--run-dir", str(run.path), "--model", model, "--no-gates"]) == 2

