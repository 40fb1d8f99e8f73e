"""The model cache: unwritable locations and partial/corrupt conversions are detected."""
from __future__ import annotations

import json

import pytest

from agp import io
from agp.backbone import embedded
from agp.backbone.cache import cache_root
from agp.errors import AGPError


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("AGP_CACHE", str(blocker / "cache"))
    with pytest.raises(AGPError, match="AGP_CACHE"):
        cache_root()


def _fake_conversion(path):
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"weights" * 100)
    files = {}
    for p in path.iterdir():
        st = p.stat()
        files[p.name] = {"size": st.st_size, "mtime": int(st.st_mtime), "mtime_ns": st.st_mtime_ns, "sha256": io.sha256_file(p)}
    io.write_json(path / embedded.MARKER, {"format": embedded.FORMAT, "files": files})


def test_partial_or_corrupt_conversion_is_not_complete(tmp_path):
    good = tmp_path / "good"
    _fake_conversion(good)
    assert embedded.is_complete(good, full=True)

    truncated = tmp_path / "truncated"
    _fake_conversion(truncated)
    (truncated / "model.safetensors").write_bytes(b"weights")
    assert not embedded.is_complete(truncated)

    flipped = tmp_path / "flipped"
    _fake_conversion(flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[3] ^= 1
    (flipped / "model.safetensors").write_bytes(bytes(data))  # same size, new mtime -> rehash
    assert not embedded.is_complete(flipped)

    no_marker = tmp_path / "no_marker"
    _fake_conversion(no_marker)
    (no_marker / embedded.MARKER).unlink()
    assert not embedded.is_complete(no_marker)

    bad_marker = tmp_path / "bad_marker"
    _fake_conversion(bad_marker)
    (bad_marker / embedded.MARKER).write_text(json.dumps({"files": {"model.safetensors": {}}}))
    assert not embedded.is_complete(bad_marker)
