"""The learned transfer adapter on a tiny Gemma: PCA at step 0, the training rounding equal to
the wire's q8_0, codes through packets into a resumer, typed refusals of codes without their
adapter, and files that refuse another model or corruption."""
from __future__ import annotations

import numpy as np
import pytest

from agp.errors import AGPError
from agp.ptp.errors import FingerprintMismatch


@pytest.fixture(scope="module")
def tiny_bb(tiny_model_dir):
    from agp.backbone import backbone
    return backbone.load(tiny_model_dir["gemma3_text"])


@pytest.fixture(scope="module")
def pool(tiny_bb):
    from agp.transfer.resume import Sender
    text = "the quick brown fox jumps over the lazy dog and then sleeps in the warm sun " * 4
    return Sender(tiny_bb, 2).states(tiny_bb.encode(text))


def test_step_0_is_pca_of_the_standardised_states(pool):
    from agp.transfer.adapter import TransferAdapter
    a = TransferAdapter.pca(2, pool, 8, 4, "hidden")
    x = (pool - a.mean_np) / a.std_np
    _, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    want = (x @ vt[:8].T @ vt[:8]) * a.std_np + a.mean_np           # projection on the top 8 directions
    assert np.allclose(a.decode(a.encode(pool)), want, atol=1e-3)
    full = TransferAdapter.pca(2, pool, pool.shape[1] - 1, 4, "hidden")
    assert np.abs(full.decode(full.encode(pool)) - pool).max() < np.abs(pool - a.decode(a.encode(pool))).max()


def test_the_training_rounding_is_the_wires_q8_0():
    import mlx.core as mx
    from agp.quant.registry import make_codec
    from agp.transfer.adapter import q8_0_straight_through
    rng = np.random.default_rng(1)
    for width in (8, 32, 40, 96):
        c = (rng.normal(size=(5, width)) * rng.uniform(0.1, 50, size=(5, 1))).astype(np.float32)
        codec = make_codec("q8_0", width)
        wire = codec.decode(codec.encode(c))
        assert np.allclose(np.asarray(q8_0_straight_through(mx.array(c))), wire, rtol=1e-5, atol=1e-6), width


def test_training_lowers_the_hidden_loss(pool):
    import mlx.core as mx
    from agp.transfer.adapter import AdapterArgs, TransferAdapter, fit_hidden, hidden_loss
    a = TransferAdapter.pca(2, pool, 8, 4, "hidden")
    before = hidden_loss(a, mx.array(pool)).item()
    fit_hidden(a, pool, AdapterArgs(steps=60, batch=32, lr=1e-3))
    assert hidden_loss(a, mx.array(pool)).item() < before


def test_codes_travel_in_packets_and_need_their_adapter(tiny_bb, pool):
    from agp.transfer.adapter import TransferAdapter
    from agp.transfer.resume import Resumer, Wire, WrongAdapter, receiver_for
    a = TransferAdapter.pca(2, pool, 8, 4, "hidden")
    other = TransferAdapter.pca(2, pool, 16, 4, "hidden")
    sent = pool[:10]
    (packet, exact), = Wire(tiny_bb, 2, "q8_0", adapter=a).packets(sent, 0)
    assert not exact and len(packet) < len(Wire(tiny_bb, 2, "q8_0").packet(sent, 0))
    _, got = Resumer(tiny_bb, 2, receiver_for(tiny_bb, adapter=a), adapter=a).accept(packet)
    assert np.allclose(got, a.decode(a.encode(sent)), atol=0.05 * np.abs(sent).max())
    with pytest.raises(FingerprintMismatch):                 # a receiver without the adapter knows no such width
        Resumer(tiny_bb, 2, receiver_for(tiny_bb)).accept(packet)
    with pytest.raises(WrongAdapter):                         # a resumer configured with another adapter
        Resumer(tiny_bb, 2, receiver_for(tiny_bb, adapter=a), adapter=other).accept(packet)


def test_adapter_files_refuse_another_model_and_corruption(tiny_bb, pool, tmp_path):
    from agp.transfer.adapter import FILE, TransferAdapter
    a = TransferAdapter.pca(2, pool, 8, 4, "logit")
    a.save(tmp_path, {"model_fingerprint": tiny_bb.fingerprint})
    b, meta = TransferAdapter.load(tmp_path, tiny_bb.fingerprint)
    assert (b.width, b.mode, b.layer) == (8, "logit", 2) and np.array_equal(b.encode(pool), a.encode(pool))
    with pytest.raises(AGPError, match="another model"):
        TransferAdapter.load(tmp_path, "0" * 64)
    raw = (tmp_path / FILE).read_bytes()
    (tmp_path / FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AGPError, match="unreadable|corrupt|does not match"):
        TransferAdapter.load(tmp_path, tiny_bb.fingerprint)


def test_a_width_that_is_no_bottleneck_is_refused(pool):
    from agp.transfer.adapter import AdapterArgs, TransferAdapter
    with pytest.raises(AGPError, match="bottleneck"):
        TransferAdapter.pca(2, pool, pool.shape[1], 4, "hidden")
    with pytest.raises(AGPError, match="modes"):
        AdapterArgs(modes=["both"]).validate()


def test_the_fisher_code_is_pca_in_the_fisher_metric(pool):
    """With gradients that see every direction equally (F = I) the Fisher code is PCA; with
    gradients along a few directions it keeps those directions better than PCA does."""
    from agp.transfer.adapter import TransferAdapter
    rng = np.random.default_rng(0)
    a = TransferAdapter.pca(2, pool, 8, 4, "hidden")
    iso = TransferAdapter.fisher(2, pool, np.eye(pool.shape[1]) / a.std_np, 8, 4, "fisher", alpha=1e-6)
    assert np.allclose(iso.decode(iso.encode(pool)), a.decode(a.encode(pool)), atol=1e-3)
    focus = np.zeros((50, pool.shape[1]))
    focus[:, 60:64] = rng.normal(size=(50, 4))           # the predictions care about raw features 60..63 only
    f = TransferAdapter.fisher(2, pool, focus, 8, 4, "fisher", alpha=1e-3)

    def err(x):
        return np.abs(x.decode(x.encode(pool))[:, 60:64] - pool[:, 60:64]).mean()
    assert err(f) < 0.5 * err(a)


def test_a_turboquant_code_travels_and_trains_with_its_rounding(tiny_bb, pool):
    import mlx.core as mx
    from agp.transfer.adapter import TransferAdapter
    from agp.transfer.resume import Resumer, Wire, receiver_for
    from agp.quant.registry import make_codec
    a = TransferAdapter.pca(2, pool, 40, 4, "hidden", codec="tq3")
    sink = np.zeros(len(pool), bool)
    off = a.wire_offset(pool, sink)
    codec = make_codec("tq3", 40)
    c = a.encode(pool)
    assert np.allclose(np.asarray(off), codec.decode(codec.encode(c)) - c, atol=1e-5)
    assert np.allclose(np.asarray(a.roundtrip(mx.array(pool), off)), a.decode(codec.decode(codec.encode(c))), atol=1e-4)
    (packet, _), = Wire(tiny_bb, 2, "tq3", adapter=a).packets(pool[:10], 0)
    _, got = Resumer(tiny_bb, 2, receiver_for(tiny_bb, adapter=a), adapter=a).accept(packet)
    assert np.allclose(got, a.decode(codec.decode(codec.encode(c[:10]))), atol=1e-4)
