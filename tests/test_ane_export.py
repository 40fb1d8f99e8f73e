"""Core ML export (agp.ane): packages read back with exact fp16 weights, correct wiring, refusals."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("coremltools", reason="Core ML export needs coremltools (./install.sh --dev)")

from agp.ane import coreml  # noqa: E402
from agp.ane.export import available, check, exit_reference  # noqa: E402
from agp.errors import AGPError  # noqa: E402
from agp.heads.controller import Controller, HeadArgs  # noqa: E402

S = 8


@pytest.fixture(scope="module")
def controller_package(tmp_path_factory):
    rng = np.random.default_rng(0)
    mx.random.seed(0)
    n_in = 48
    ctl = Controller(n_in, {"route": 4, "vitality": 4, "earliest": 3}, HeadArgs(hidden=16),
                     mean=rng.normal(size=n_in) * 50, std=rng.uniform(1, 30, n_in))
    spec = coreml.controller_spec(ctl, "a" * 64)
    out = tmp_path_factory.mktemp("ane")
    entry = coreml.export(spec, out, S)
    x = (rng.normal(size=(S, n_in)) * 20 + ctl.mean).astype(np.float32)
    return ctl, spec, out / entry["package"], entry, x


def test_controller_package_has_exact_weights_and_the_mlx_outputs(controller_package):
    ctl, spec, package, entry, x = controller_package
    assert entry["inputs"] == {"x": [1, 48, 1, S]} and entry["bytes"] > 0
    result = check(spec, package, {"x": x}, ctl.logits(x), S)
    assert result["shapes_ok"] and result["weights_exact"] and result["weights_checked"] == 10
    assert {"conv", "gelu", "sub", "mul"} <= set(result["ops"])
    for task, w in result["wiring"].items():
        # fp16 inputs and weights against MLX fp32: a few 1e-3 relative at most
        assert w["rel_err"] < 5e-3 and w["argmax_agreement"] == 1.0, task


def test_exit_head_package_on_a_tiny_gemma(tiny_model_dir, tmp_path):
    from agp.backbone import backbone
    from agp.heads.exit import ExitHead
    bb = backbone.load(tiny_model_dir["gemma3_text"])
    head = ExitHead.identity(bb, 1, np.arange(0, bb.vocab_size, 3))
    head.params.W = mx.random.normal(head.params.W.shape) * 0.05
    head.params.bias = mx.random.normal(head.params.bias.shape) * 0.1
    h = np.random.default_rng(1).normal(size=(S, bb.hidden_size)).astype(np.float32) * 30
    ref = exit_reference(head, h)
    spec = coreml.exit_spec(head, "b" * 64)
    entry = coreml.export(spec, tmp_path, S)
    result = check(spec, tmp_path / entry["package"], {"x": h}, ref, S)
    assert result["shapes_ok"] and result["weights_exact"]
    assert result["wiring"]["top1"]["agreement"] == 1.0
    assert result["wiring"]["logits"]["rel_err"] < 5e-3 and result["wiring"]["p1"]["rel_err"] < 5e-3


def test_a_wrong_weight_is_reported_not_hidden(controller_package):
    ctl, spec, package, _, x = controller_package
    tampered = coreml.ModuleSpec(spec.name, spec.inputs, spec.outputs,
                                 {**spec.weights, "route_b": spec.weights["route_b"] + np.float16(1)},
                                 spec.source_sha256, spec.build)
    assert check(tampered, package, {"x": x}, ctl.logits(x), S)["weights_mismatched"] == ["route_b"]


def test_a_package_from_other_weights_is_refused(controller_package):
    _, spec, package, _, _ = controller_package
    with pytest.raises(AGPError, match="exported from other weights"):
        coreml.check_provenance(coreml.read_back(package), package, "c" * 64)


def test_damaged_and_missing_packages_are_refused(controller_package, tmp_path):
    import shutil
    _, _, package, _, _ = controller_package
    with pytest.raises(AGPError, match="not a Core ML package"):
        coreml.read_back(tmp_path / "nothing.mlpackage")
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(package, broken)
    (next(broken.rglob("model.mlmodel"))).write_bytes(b"\x00garbage")
    with pytest.raises(AGPError, match="unreadable"):
        coreml.read_back(broken)


def test_a_run_without_heads_names_the_stage(tmp_path):
    with pytest.raises(AGPError, match="agp run --stage controller"):
        available(tmp_path, ["controller"])
    with pytest.raises(AGPError, match="agp run --stage runtime"):
        available(tmp_path, ["exit"])
    with pytest.raises(AGPError, match="unknown head"):
        available(tmp_path, ["semantic"])
