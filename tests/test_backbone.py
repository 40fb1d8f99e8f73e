"""Segmented forward equals mlx-lm's forward on every supported architecture; bad inputs fail clearly."""
from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

from agp.backbone import load
from agp.backbone.macs import summary
from agp.errors import AGPError
from tests.conftest import ARCHS

mx.set_default_device(mx.cpu)
TEXT = "def f(x):\n    return x + 1  # tiny"


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_parity(tiny_model_dir, arch):
    bb = load(tiny_model_dir[arch])
    tok = mx.array([bb.encode(TEXT)])
    assert mx.abs(bb.forward(tok) - bb.model(tok)).max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_parity_with_split_segments(tiny_model_dir, arch):
    """Token-by-token decoding with the KV cache, each step run as two segments, past the sliding window."""
    bb = load(tiny_model_dir[arch])
    tok = mx.array([bb.encode(TEXT)])
    c1, c2 = bb.make_cache(), bb.make_cache()
    a, b = bb.model(tok, cache=c1), bb.forward(tok, cache=c2)
    mid = bb.n_layers // 2
    for _ in range(12):  # the tiny configs' window is 8 tokens: decoding crosses it
        assert mx.abs(a - b).max().item() <= 1e-4
        nxt = mx.argmax(a[:, -1], axis=-1).reshape(1, 1)
        a = bb.model(nxt, cache=c1)
        p = bb.start(nxt, c2)
        b = bb.head(p.run(p.run(p.h0, 0, mid), mid, bb.n_layers))
    assert mx.abs(a - b).max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_returns_the_states_the_segments_produce(tiny_model_dir, arch):
    bb = load(tiny_model_dir[arch])
    tok = mx.array([bb.encode(TEXT)])
    logits, hidden = bb.capture(tok, [0, 2, bb.n_layers])
    p = bb.start(tok)
    h2 = p.run(p.h0, 0, 2)
    assert mx.abs(hidden[0] - p.h0).max().item() == 0
    assert mx.abs(hidden[2] - h2).max().item() <= 1e-5
    assert mx.abs(bb.head(hidden[bb.n_layers]) - logits).max().item() <= 1e-5
    with pytest.raises(AGPError, match="capture layers"):
        bb.capture(tok, [bb.n_layers + 1])


def test_macs_cover_every_layer_and_head(tiny_model_dir):
    bb = load(tiny_model_dir["gemma3_text"])
    s = summary(bb, context=16)
    assert len(s["layers"]) == bb.n_layers and all(m > 0 for m in s["layers"])
    assert s["head"] == bb.vocab_size * bb.hidden_size
    assert abs(s["head_share"] + s["layers_share"] - 1) < 1e-12


def test_encode_prepends_bos_and_rejects_bad_prompts(tiny_model_dir):
    bb = load(tiny_model_dir["gemma3_text"])
    ids = bb.encode("hi")
    assert ids[0] == bb.bos_id and ids.count(bb.bos_id) == 1
    with pytest.raises(AGPError, match="empty prompt"):
        bb.encode("   ")
    with pytest.raises(AGPError, match="over the limit"):
        bb.encode("x" * 600)
    assert bb.encode("x" * 600, max_tokens=10, truncate=True) == bb.encode("x" * 9)
    with pytest.raises(AGPError, match="must be text"):
        bb.encode(b"\xff\xfe")


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(AGPError, match="does not exist"):
        load(str(tmp_path / "nope"))
    with pytest.raises(AGPError, match="no config.json"):
        load(str(tmp_path))


def test_unsupported_architecture_is_a_clear_error(tiny_model_dir, tmp_path):
    dest = tmp_path / "llama"
    shutil.copytree(tiny_model_dir["gemma3_text"], dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["model_type"] = "llama"
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AGPError, match="does not support"):
        load(str(dest))


def test_adapter_dir_without_config_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(AGPError, match="adapter_config.json"):
        load(tiny_model_dir["gemma3_text"], adapter=str(tmp_path))
