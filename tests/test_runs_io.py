"""Run directories, manifests, atomic writes, config round trips, BLAS detection."""
from __future__ import annotations

import json
import os
import platform

import pytest
from hypothesis import given, strategies as st

from agp import BLAS, io, runs
from agp.config import ConfigMixin
from agp.data.splits import SPLITS, content_id, split_of
from agp.errors import AGPError
from agp.train.baseline import BaselineArgs


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        io.write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"], "no temp file may be left behind"


def test_new_run_manifest_and_latest(tmp_path):
    r = runs.new_run(tmp_path, argv=["run", "--stage", "baseline"], config={"model": None})
    assert (tmp_path / "latest").resolve() == r.path.resolve()
    m = r.manifest
    assert m["reproduce"] == "agp run --stage baseline"
    assert m["platform"]["blas"]["blas"] == BLAS["blas"]
    r.update_stage("baseline", status="done", metrics={"x": 1})
    again = runs.latest_run(tmp_path)
    assert again.require("baseline", "test")["metrics"] == {"x": 1}
    with pytest.raises(AGPError, match="agp run --stage adapter"):
        again.require("adapter", "controller")


def test_corrupt_or_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(AGPError, match="no runs"):
        runs.latest_run(tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "manifest.json").write_text("{truncated")
    with pytest.raises(AGPError, match="corrupt manifest"):
        runs.Run(tmp_path / "r")


def test_config_round_trip_warns_on_unknown_keys():
    cfg = BaselineArgs(per_source=3)
    assert BaselineArgs.from_dict(cfg.to_dict()) == cfg
    with pytest.warns(UserWarning, match="unknown keys"):
        assert BaselineArgs.from_dict({**cfg.to_dict(), "typo": 1}) == cfg
    assert issubclass(BaselineArgs, ConfigMixin)


@given(st.text(min_size=1, max_size=200))
def test_splits_are_a_pure_function_of_content(text):
    assert split_of(text) == split_of(str(text)) and split_of(text) in SPLITS
    assert len(content_id(text)) == 16


def test_split_proportions_are_roughly_80_10_10():
    counts = {s: 0 for s in SPLITS}
    for i in range(5000):
        counts[split_of(f"prompt {i}")] += 1
    assert 0.77 < counts["train"] / 5000 < 0.83 and 0.08 < counts["heldout"] / 5000 < 0.12


@pytest.mark.skipif(platform.system() != "Linux", reason="OpenBLAS loading is a Linux concern (Macs use Accelerate)")
def test_fast_blas_is_in_use_on_linux():
    assert BLAS["blas"] == "openblas", f"slow reference BLAS in use: {BLAS}; install libopenblas0-pthread"
    assert os.path.exists(BLAS["path"])


def test_atomic_dir_replaces_only_on_success(tmp_path):
    dest = tmp_path / "model"
    with io.atomic_dir(dest) as work:
        (work / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(dest) as work:
            (work / "a.txt").write_text("two")
            raise RuntimeError("interrupted")
    assert (dest / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temp directory may be left behind"


def test_artifacts_are_recorded_relative_to_the_run_and_survive_a_copy(tmp_path):
    import shutil
    run = runs.new_run(tmp_path / "a", argv=["run"])
    weights = run.stage_dir("adapter") / "adapter"
    weights.mkdir()
    run.update_stage("adapter", status="done", artifacts={"adapter_dir": run.relative(weights),
                                                          "old_style": f"runs/{run.id}/adapter/adapter"})
    assert run.stage("adapter")["artifacts"]["adapter_dir"] == "adapter/adapter"
    copy = runs.Run(shutil.copytree(run.path, tmp_path / "b" / run.id))
    assert copy.artifact("adapter", "adapter_dir") == copy.path / "adapter" / "adapter"
    assert copy.artifact("adapter", "old_style") == copy.path / "adapter" / "adapter", "older cwd-relative paths"
    assert copy.artifact("adapter", "missing") is None
