"""Small pieces of stage 1: atomic safetensors, checkpoint identity, flag validation, probe positions."""
from __future__ import annotations

import argparse

import mlx.core as mx
import pytest

from agp import config
from agp.errors import AGPError
from agp.train import adapter, nll, tuner


def test_save_safetensors_is_atomic_and_leaves_no_temp(tmp_path):
    from agp.io import write_safetensors
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"a": mx.ones((2, 3))})
    assert mx.load(str(path))["a"].shape == (2, 3)
    with pytest.raises(Exception):
        write_safetensors(path, {"a": "not an array"})
    assert mx.load(str(path))["a"].shape == (2, 3)          # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_checkpoint_state_is_ignored_when_missing_corrupt_or_foreign(tmp_path):
    ck = tuner.Checkpoints(tmp_path, "ident-a")
    assert ck.load() is None
    (tmp_path / "state.json").write_text("{not json")
    assert ck.load() is None
    (tmp_path / "adapters.0000002.safetensors").write_bytes(b"")
    (tmp_path / "state.json").write_text('{"step": 2, "adapters": "adapters.0000002.safetensors", '
                                         '"optimizer": "o", "fingerprint": "ident-b"}')
    assert ck.load() is None
    assert tuner.Checkpoints(tmp_path, "ident-b").load()["step"] == 2


def test_flags_are_validated():
    p = argparse.ArgumentParser()
    config.add_arguments(p, adapter.AdapterArgs, adapter.NAME, adapter.ALIASES)
    cfg = adapter.config_from(p.parse_args(["--adapter-iters", "50", "--adapter-kind", "dora"]))
    assert cfg.iters == 50 and cfg.kind == "dora" and cfg.blocks == adapter.AdapterArgs.blocks
    with pytest.raises(SystemExit):   # refused by argparse itself, before anything runs
        p.parse_args(["--adapter-iters", "0"])
    with pytest.raises(AGPError, match="--adapter-iters must be at least 1"):   # library callers too
        adapter.config_from(argparse.Namespace(adapter__iters=0))


def test_probe_positions():
    from agp.backbone.lens import probe_positions
    assert probe_positions(3, 8) == [1, 2]
    pos = probe_positions(64, 4)
    assert len(pos) == 4 and pos[0] == 1 and pos[-1] == 63
