"""The depth stage end to end on a tiny model (baseline, controller, runtime first), routed
generation through its revive operation, and the refusals (other model or block, NaN weights,
a run without the controller's translators)."""
from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from agp.cli import main
from agp.errors import AGPError
from tests.conftest import run_tiny_stages


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model = tiny_model_dir["gemma3_text"]
    return run_tiny_stages(root, model, ["baseline", "controller", "runtime", "depth"], {"runtime": ["--runtime-new-tokens", "4"]}), model


def test_depth_stage_writes_modules_ablation_and_revive(tiny_run):
    run, _ = tiny_run
    rec = run.stage("depth")
    assert rec["status"] == "done"
    m = rec["metrics"]
    assert m["layers"] == [4, 5] and m["decision_layer"] == 4          # D and the late boundary of 6 layers
    assert all(m["identity_exact"].values())
    variants = {(r["layer"], r["variant"]) for r in m["ablation"]}
    assert len(variants) == 10
    for r in m["ablation"]:
        assert np.isfinite(r["kl"]) and 0 <= r["top1"] <= 1 and 0 <= r["acceptable"] <= 1
    d = run.path / "depth"
    for f in ("report.md", "ablation_L4.png", "ablation_L5.png", "identity_sample.npz", "revive/revive.json"):
        assert (d / f).stat().st_size > 0, f
    assert all(r["macs"] < r["remaining_macs"] for r in m["revive"]["rows"])


def test_trained_module_reloads_and_refuses_another_model_or_block(tiny_run):
    from agp.backbone import load
    from agp.heads.depth import DepthModule
    run, model = tiny_run
    bb = load(model)
    d = run.path / "depth" / "modules" / "L4"
    m, meta = DepthModule.load(d, bb.fingerprint, 4)
    assert meta["layer"] == 4 and m.sources == list(range(5))
    with pytest.raises(AGPError, match="another model"):
        DepthModule.load(d, "0" * 64, 4)
    with pytest.raises(AGPError, match="block 4, but block 5"):
        DepthModule.load(d, bb.fingerprint, 5)


def test_nan_weights_are_refused(tiny_run, tmp_path):
    from agp.backbone import load
    from agp.heads.depth import DepthModule
    run, model = tiny_run
    bad = tmp_path / "L4"
    shutil.copytree(run.path / "depth" / "modules" / "L4", bad)
    w = mx.load(str(bad / "depth_module.safetensors"))
    w["up"] = w["up"] * float("nan")
    mx.save_safetensors(str(bad / "depth_module.safetensors"), w)
    with pytest.raises(AGPError, match="non-finite values in 'up'"):
        DepthModule.load(bad, load(model).fingerprint, 4)


def test_routed_generation_uses_the_revive_operation(tiny_run, capsys):
    run, model = tiny_run
    assert main(["generate", "def f(x):", "--mode", "routed", "--run", str(run.path), "--model", model,
                 "--max-new-tokens", "4"]) == 0
    assert "[routed] 4 tokens" in capsys.readouterr().err


def test_revive_token_equals_the_module_decode(tiny_run):
    """The runtime's revive op on one position emits the shortlist argmax of module + translator."""
    from agp.backbone import load
    from agp.runtime.revive import Reviver
    run, model = tiny_run
    bb = load(model)
    rv = Reviver.load(bb, run.path / "depth" / "revive")
    z = np.load(run.path / "depth" / "identity_sample.npz")
    states = {int(k[1:]): mx.array(z[k][:1][None]) for k in z.files}
    tok, p1, cost = rv.token(states)
    h = rv.module.apply({s: z[f"h{s}"][:1] for s in rv.sources})
    want = int(rv.decoder.ids_np[int(mx.argmax(rv.decoder.logits(h), axis=-1)[0].item())])
    assert tok == want and 0 < p1 <= 1 and cost.macs == rv.macs()


def test_a_run_without_translators_names_the_stage(tiny_run, tmp_path, capsys):
    run, model = tiny_run
    bare = tmp_path / "bare"
    shutil.copytree(run.path, bare)
    (bare / "controller" / "translators.npz").unlink()
    assert main(["run", "--stage", "depth", "--run-dir", str(bare), "--model", model, "--no-gates"]) != 0
    err = capsys.readouterr().err
    assert "translators" in err and "agp run --stage controller" in err


def test_export_coreml_cli_exports_every_landed_head(tiny_run, tmp_path):
    """`agp export coreml` on a run with the depth stage: the depth modules and the revive
    operation are exported beside the controller and exit heads, each exact and computing MLX."""
    pytest.importorskip("coremltools", reason="Core ML export needs coremltools (./install.sh --dev)")
    import json
    run, model = tiny_run
    assert main(["export", "coreml", "--run", str(run.path), "--model", model, "--positions", "4"]) == 0
    record = json.loads((run.path / "ane" / "export.json").read_text())
    names = set(record["modules"])
    assert {"controller", "revive_L" + str(json.loads((run.path / "depth" / "revive" / "revive.json").read_text())["layer"])} <= names
    assert any(n.startswith("depth_L") for n in names) and any(n.startswith("exit_L") for n in names), names
    feature = json.loads((run.path / "runtime" / "runtime.json").read_text()).get("feature_draft")
    assert ("draft" in names) == bool(feature), names
    for name, e in record["modules"].items():
        p = e["parity"]
        assert p["shapes_ok"] and p["weights_exact"] and not p["fp16_overflow"], name
        assert all(w.get("rel_err", 0) < 1e-2 for w in p["wiring"].values()), (name, p["wiring"])
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert set(manifest["exports"]["coreml"]["modules"]) == names


def test_bench_ane_times_every_module_and_says_what_needs_a_mac(tiny_run, capsys):
    import json
    import platform
    run, model = tiny_run
    assert main(["bench", "ane", "--run", str(run.path), "--model", model, "--positions", "1,2", "--repeats", "2"]) == 0
    report = json.loads((run.path / "ane" / "latency.json").read_text())
    modules = {r["module"] for r in report["rows"]}
    assert {"controller", "revive_L" + str(json.loads((run.path / "depth" / "revive" / "revive.json").read_text())["layer"])} <= modules
    assert {r["positions"] for r in report["rows"]} == {1, 2}
    assert all(r["median_ms"] > 0 and r["p95_ms"] >= r["median_ms"] for r in report["rows"])
    if platform.system() != "Darwin":
        assert {r["backend"] for r in report["rows"]} == {"mlx cpu"}
        assert any("needs macOS" in n for n in report["notes"]) and "needs macOS" in capsys.readouterr().out


def test_export_verify_refuses_a_package_whose_head_changed(tiny_run, tmp_path, capsys):
    """Bad input: a head retrained (or reshaped) after its export. `--verify` re-checks the saved
    packages against the run's current heads and refuses the stale one by its source fingerprint."""
    pytest.importorskip("coremltools", reason="Core ML export needs coremltools (./install.sh --dev)")
    import shutil

    import mlx.core as mx
    run, model = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    if not (copy / "ane" / "export.json").exists():
        assert main(["export", "coreml", "--run", str(copy), "--model", model, "--positions", "4"]) == 0
    assert main(["export", "coreml", "--run", str(copy), "--model", model, "--verify"]) == 0
    heads = copy / "controller" / "heads" / "heads.safetensors"
    w = mx.load(str(heads))
    name = next(k for k in w if k.endswith("bias"))
    w[name] = w[name] + 1.0
    mx.save_safetensors(str(heads), w)
    capsys.readouterr()
    assert main(["export", "coreml", "--run", str(copy), "--model", model, "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exported from other weights" in err[0] and "re-export" in err[0], err


def test_controller_sidecar_is_checked_before_core_ml_is_asked(tiny_run, tmp_path, capsys):
    """`agp generate --mode routed --controller-on CPU_AND_NE`: the package must decide one position
    per call and come from the run's controller; off macOS it then stops with the reason."""
    pytest.importorskip("coremltools", reason="Core ML export needs coremltools (./install.sh --dev)")
    import platform
    import shutil
    run, model = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    gen = ["generate", "the cat", "--run", str(copy), "--model", model, "--max-new-tokens", "3"]
    assert main(["export", "coreml", "--run", str(copy), "--model", model, "--heads", "controller", "--positions", "4"]) == 0
    capsys.readouterr()
    assert main([*gen, "--mode", "routed", "--controller-on", "CPU_AND_NE"]) == 2
    assert "one per token" in capsys.readouterr().err
    assert main([*gen, "--mode", "full", "--controller-on", "CPU_AND_NE"]) == 2
    assert "applies to mode routed" in capsys.readouterr().err
    assert main(["export", "coreml", "--run", str(copy), "--model", model, "--heads", "controller", "--positions", "1"]) == 0
    capsys.readouterr()
    rc = main([*gen, "--mode", "routed", "--controller-on", "CPU_AND_NE"])
    bench = main(["bench", "runtime", "--run", str(copy), "--model", model, "--prompts", "1", "--new-tokens", "2",
                  "--controller-on", "CPU_AND_NE"])
    if platform.system() == "Darwin":
        assert rc == 0 and bench == 0
    else:
        assert rc == 2 and bench == 2
        assert capsys.readouterr().err.count("needs macOS") == 2
