"""The runtime stage end to end on a tiny model (baseline + controller first), then `agp generate`
in every mode from that run, and the run-level refusals (other model, NaN head, missing stage)."""
from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

from agp.cli import main
from tests.conftest import run_tiny_stages


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model = tiny_model_dir["gemma3_text"]
    return run_tiny_stages(root, model, ["baseline", "controller", "runtime"]), root, model


def test_runtime_stage_writes_heads_bench_and_report(tiny_run):
    run, _, _ = tiny_run
    rec = run.stage("runtime")
    assert rec["status"] == "done"
    m = rec["metrics"]
    d = run.path / "runtime"
    meta = json.loads((d / "runtime.json").read_text())
    assert set(meta["exit_layers"]) >= {2, 3, 4, 5}          # swept + controller D (4) + late boundary (5)
    for E in meta["exit_layers"]:
        assert (d / "exit_heads" / f"L{E}" / "exit_head.safetensors").exists()
    for f in ("bench.json", "sweep.json", "report.md", "frontier.png"):
        assert (d / f).stat().st_size > 0, f
    runs = json.loads((d / "bench.json").read_text())["runs"]
    spec = [r for r in runs if r["mode"] == "speculative"]
    assert spec and all(r["vs_full"]["identical"] for r in spec)
    assert max(r["prompt_tokens"] for r in spec) == 300
    assert all(r["vs_anchor"]["identical"] for r in runs if r["mode"] == "full")
    assert all(r["energy"]["total"] >= 0 and r["energy"]["unit"] for r in runs)      # every run metered
    assert m["bench"]["energy"]["source"] and all("energy_per_token" in r for r in m["bench"]["table"])
    modes = {r["mode"] for r in m["bench"]["table"]}
    assert {"mlx_lm.generate", "full", "speculative", "routed", "exit:2"} <= modes
    assert {r["vocab"] for r in m["sweep"]} >= {128, 384}


@pytest.mark.parametrize("mode", ["full", "speculative", "exit:3", "entropy", "routed"])
def test_generate_every_mode_from_the_run(tiny_run, capsys, mode):
    run, _, model = tiny_run
    assert main(["generate", "def f(x):", "--mode", mode, "--run", str(run.path), "--model", model,
                 "--max-new-tokens", "4"]) == 0
    assert f"[{mode}] 4 tokens" in capsys.readouterr().err


def test_generate_refuses_another_model_and_nan_heads(tiny_run, tiny_model_dir, capsys, tmp_path):
    run, _, model = tiny_run
    assert main(["generate", "x", "--mode", "speculative", "--run", str(run.path),
                 "--model", tiny_model_dir["gemma4_text"]]) == 2
    assert "another model" in capsys.readouterr().err
    bad = tmp_path / "run"
    shutil.copytree(run.path, bad)
    head = bad / "runtime" / "exit_heads" / "L2" / "exit_head.safetensors"
    w = mx.load(str(head))
    w["b"] = w["b"] * float("nan")
    mx.save_safetensors(str(head), w)
    assert main(["generate", "x", "--mode", "speculative", "--run", str(bad), "--model", model]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and err.count("\n") == 1
    assert main(["generate", "x", "--mode", "exit:1", "--run", str(run.path), "--model", model]) == 2
    assert "no exit head at layer 1" in capsys.readouterr().err


def test_generate_names_the_missing_stage(tiny_run, capsys, tmp_path):
    run, _, model = tiny_run
    bare = tmp_path / "bare"
    shutil.copytree(run.path, bare)
    m = json.loads((bare / "manifest.json").read_text())
    del m["stages"]["runtime"]
    (bare / "manifest.json").write_text(json.dumps(m))
    assert main(["generate", "x", "--mode", "speculative", "--run", str(bare), "--model", model]) == 2
    assert "agp run --stage runtime" in capsys.readouterr().err


def test_bench_runtime_reads_the_run(tiny_run, capsys):
    run, _, _ = tiny_run
    assert main(["bench", "runtime", "--run", str(run.path), "--prompts", "1", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "speculative" in out and "mlx_lm.generate" in out and "profile (ms)" in out
    # one energy block with its unit; the CPU-seconds proxy says so on every header
    assert "energy: " in out and "/token" in out
    assert ("(proxy)" in out) == ("cpu-seconds proxy" in out)
