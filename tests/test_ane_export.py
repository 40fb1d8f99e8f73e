"""Core ML export (agp.ane): packages read back with exact fp16 weights, correct wiring, refusals."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("coremltools", reason="Core ML export needs coremltools (./install.sh --dev)")

from agp.ane import coreml, modules  # noqa: E402
from agp.ane.export import available, check, shortlist_outputs, source_rows  # noqa: E402
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
    spec = modules.controller_spec(ctl, "a" * 64)
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
    ref = shortlist_outputs(head.logits(mx.array(h)))
    spec = modules.exit_spec(head, "b" * 64)
    entry = coreml.export(spec, tmp_path, S)
    result = check(spec, tmp_path / entry["package"], {"x": h}, ref, S)
    assert result["shapes_ok"] and result["weights_exact"]
    assert result["wiring"]["top1"]["agreement"] == 1.0
    assert result["wiring"]["logits"]["rel_err"] < 5e-3 and result["wiring"]["p1"]["rel_err"] < 5e-3


def test_a_wrong_weight_is_reported_not_hidden(controller_package):
    ctl, spec, package, _, x = controller_package
    tampered = modules.ModuleSpec(spec.name, spec.inputs, spec.outputs,
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
    with pytest.raises(AGPError, match="agp run --stage depth"):
        available(tmp_path, ["revive"])
    with pytest.raises(AGPError, match="unknown head"):
        available(tmp_path, ["semantic"])


# --- the depth module, the revive operation and the feature draft head on a tiny Gemma ------------
@pytest.fixture(scope="module")
def tiny_gemma(tiny_model_dir):
    from agp.backbone import backbone
    return backbone.load(tiny_model_dir["gemma3_text"])


def _tiny_depth_module(bb, layer: int):
    """A depth module with every trainable part non-zero (identity would hide wiring mistakes)."""
    from agp.heads.depth import DepthModule
    rng = np.random.default_rng(2)
    sources = list(range(layer + 1))
    states = {s: rng.normal(size=(64, bb.hidden_size)).astype(np.float32) * (5 + 20 * s) for s in sources}
    module = DepthModule.identity(layer, sources, states, rank=8, seed=0)
    p = module.params
    for name in ("q", "q_b", "g", "g_b", "up", "c"):
        setattr(p, name, mx.array(rng.normal(size=getattr(p, name).shape).astype(np.float32) * 0.3))
    return module, {s: v[:S] for s, v in states.items()}


def _export_and_check(spec, tmp_path, inputs, ref):
    entry = coreml.export(spec, tmp_path, S)
    result = check(spec, tmp_path / entry["package"], inputs, ref, S)
    assert result["shapes_ok"] and result["weights_exact"], result["weights_mismatched"]
    assert result["fp16_overflow"] == [], result["fp16_overflow"]
    return result


def test_depth_module_package_routes_like_mlx(tiny_gemma, tmp_path):
    module, states = _tiny_depth_module(tiny_gemma, 2)
    routed = np.asarray(module.apply(states))
    assert np.abs(routed - states[2]).max() > 1e-2         # the module really changes the state
    spec = modules.depth_spec(module, "d" * 64, S)
    result = _export_and_check(spec, tmp_path, {"x": source_rows(states, module.sources)}, {"routed": routed})
    assert {"softmax", "slice_by_index", "reshape", "reduce_sum", "sigmoid"} <= set(result["ops"])
    assert result["wiring"]["routed"]["rel_err"] < 5e-3


def test_revive_package_emits_the_mlx_token(tiny_gemma, tmp_path):
    from agp.heads.depth import Decoder
    from agp.oracle.probes import Translator
    from agp.runtime.revive import Reviver
    bb = tiny_gemma
    module, states = _tiny_depth_module(bb, 2)
    rng = np.random.default_rng(3)
    t = Translator(np.eye(bb.hidden_size, dtype=np.float32) + rng.normal(size=(bb.hidden_size,) * 2).astype(np.float32) * 0.05,
                   rng.normal(size=bb.hidden_size).astype(np.float32) * 0.1)
    rev = Reviver(bb, module, Decoder(bb, np.arange(0, bb.vocab_size, 2), t))
    ref = shortlist_outputs(rev.decoder.logits(module.apply(states)))
    result = _export_and_check(modules.revive_spec(rev, "e" * 64, S), tmp_path,
                               {"x": source_rows(states, module.sources)}, ref)
    assert result["wiring"]["top1"]["agreement"] == 1.0 and result["wiring"]["logits"]["rel_err"] < 5e-3


def test_feature_draft_package_predicts_like_mlx(tiny_gemma, tmp_path):
    from agp.heads.draft import FeatureDraftHead, token_embeddings
    bb = tiny_gemma
    mx.random.seed(4)
    head = FeatureDraftHead(bb, np.arange(0, bb.vocab_size, 2), inner=32)
    head.params.bias = mx.random.normal(head.params.bias.shape) * 0.1
    rng = np.random.default_rng(4)
    f = rng.normal(size=(S, bb.hidden_size)).astype(np.float32) * 30
    e = token_embeddings(bb, rng.integers(0, bb.vocab_size, S))
    state = np.asarray(head.predict(mx.array(f), mx.array(e)))
    ref = {"next_state": state, **shortlist_outputs(head.shortlist_logits(mx.array(state)))}
    result = _export_and_check(modules.draft_spec(head, "f" * 64, S), tmp_path, {"x": np.concatenate([f, e], 1)}, ref)
    assert {"concat", "slice_by_index"} <= set(result["ops"])
    assert result["wiring"]["next_state"]["rel_err"] < 5e-3 and result["wiring"]["top1"]["agreement"] == 1.0


def test_an_fp16_overflow_is_reported(controller_package):
    """float64 evaluation cannot overflow, so the check reports any intermediate past fp16's range."""
    ctl, spec, package, _, x = controller_package
    result = check(spec, package, {"x": x * 1e4}, ctl.logits(x * 1e4), S)
    assert result["fp16_overflow"] and result["largest_intermediate"] > coreml.FP16_MAX
