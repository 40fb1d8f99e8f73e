"""Stage 6 gate (ANE part): the run's shallow heads export to Core ML packages whose structure and
fp16 weights are exact and whose saved program computes the MLX module (on every platform); Core ML
prediction parity and the routing decisions through Core ML on macOS. Exports into a temporary
directory: the gate reads the run, it never writes into it."""
from __future__ import annotations

import platform

import numpy as np
import pytest

from gates import thresholds as T

pytestmark = pytest.mark.stage6
pytest.importorskip("coremltools", reason="the stage-6 gate needs coremltools (./install.sh --dev)")


@pytest.fixture(scope="module")
def exported(agp_run, tmp_path_factory):
    from agp.ane.export import export_run
    out = tmp_path_factory.mktemp("ane")
    return export_run(agp_run.path, out_dir=out), out


def test_every_landed_head_is_exported(agp_run, exported):
    import json
    record, out = exported
    names = set(record["modules"])
    assert "controller" in names and any(n.startswith("exit_L") for n in names), names
    if agp_run.stage("depth").get("status") == "done":
        assert any(n.startswith("revive_L") for n in names) and any(n.startswith("depth_L") for n in names), names
    if json.loads((agp_run.path / "runtime" / "runtime.json").read_text()).get("feature_draft"):
        assert "draft" in names, names
    for name, e in record["modules"].items():
        assert (out / e["package"] / "Manifest.json").exists(), name
        assert len(e["source_sha256"]) == 64 and e["compute_precision"] == "float16"


def test_structure_and_weights_are_exact(exported):
    for name, e in exported[0]["modules"].items():
        p = e["parity"]
        assert p["shapes_ok"], f"{name}: declared inputs/outputs differ from the module's"
        assert p["weights_exact"], f"{name}: stored weights differ from the MLX weights: {p['weights_mismatched']}"
        assert "conv" in p["ops"], f"{name}: no 1x1 convolution (the Neural Engine layout)"


def test_no_intermediate_leaves_fp16_range(exported):
    """The numpy evaluation runs in float64, so it records what fp16 on the device would overflow."""
    for name, e in exported[0]["modules"].items():
        assert not e["parity"]["fp16_overflow"], f"{name}: past fp16's range: {e['parity']['fp16_overflow']}"


def per_compute_unit(test):
    """macOS only (Core ML's runtime), once per compute unit the runtime can be asked for."""
    test = pytest.mark.parametrize("units", ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"])(test)
    test = pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML prediction needs macOS: "
                              "coremltools has no Core ML runtime on this platform")(test)
    return pytest.mark.macos(test)


def _within_bounds(label: str, wiring: dict) -> None:
    for out, w in wiring.items():
        if "rel_err" in w:
            assert w["rel_err"] <= T.STAGE6_WIRING_REL_ERR_MAX, f"{label}.{out}: relative error {w['rel_err']:.2e}"
        agree = w.get("agreement", w.get("argmax_agreement"))
        if agree is not None:
            assert agree >= T.STAGE6_ARGMAX_AGREEMENT_MIN, f"{label}.{out}: agreement {agree:.3f}"


def test_saved_program_computes_the_mlx_module(exported):
    for name, e in exported[0]["modules"].items():
        _within_bounds(name, e["parity"]["wiring"])


@per_compute_unit
def test_core_ml_prediction_of_every_module_matches_mlx(agp_run, exported, units):
    from agp.ane.export import coreml_parity
    record, out = exported
    for name, wiring in coreml_parity(agp_run.path, out, record, units).items():
        _within_bounds(f"{name} on {units}", wiring)


@per_compute_unit
def test_core_ml_prediction_matches_mlx_and_keeps_the_decisions(agp_run, exported, units):
    from agp.ane import coreml
    from agp.ane.export import held_out_features
    from agp.heads.controller import load_deployed, route_decisions
    from agp.calibrate import policy
    from agp.calibrate.temperature import softmax
    record, out = exported
    ctl, calib = load_deployed(agp_run.path / "controller" / "heads")
    x = held_out_features(agp_run.path, record["positions"])
    got = coreml.predict(out / "controller.mlpackage", {"x": coreml.to_channels_first(x)}, units)
    mine = coreml.from_channels_first(got["route"]).astype(np.float32)
    ref = ctl.logits(x)["route"]
    assert np.abs(mine - ref).max() / np.abs(ref).max() <= T.STAGE6_WIRING_REL_ERR_MAX
    act = policy.decide(softmax(mine, calib["temperatures"]["route"]), calib["thresholds"])
    assert (act == route_decisions(ctl, calib, x)["action"]).mean() >= T.STAGE6_ARGMAX_AGREEMENT_MIN
