"""TurboQuant core: rotation, Lloyd-Max codebooks, bit packing, batch encode/decode."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from agp.errors import AGPError
from agp.quant import bitpack, lloyd_max
from agp.quant.rotation import Rotation
from agp.quant.turboquant import TurboQuant, decode_blob, mse_bound


@pytest.mark.parametrize("dim,padded,kind", [(640, 640, "hadamard"), (1536, 1536, "hadamard"), (2048, 2048, "hadamard"),
                                              (100, 128, "hadamard"), (3, 4, "hadamard"),
                                              (640, 640, "dense"), (100, 100, "dense"), (3, 3, "dense")])
def test_rotation_is_orthogonal_and_invertible(dim, padded, kind):
    r = Rotation(dim, seed=3, kind=kind)
    assert r.padded_dim == (padded if kind == "hadamard" else dim)
    x = np.random.default_rng(0).standard_normal((7, dim)).astype(np.float32)
    y = r.apply(x)
    assert y.shape == (7, r.padded_dim) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(r.invert(y), x, atol=1e-5)
    # inner products survive too (orthogonality, not just norm preservation)
    np.testing.assert_allclose(y @ y.T, x @ x.T, rtol=1e-4, atol=1e-3)


def _butterfly(y, block):
    # the textbook in-place fast Walsh-Hadamard transform, orthonormal
    y = y.reshape(-1, block).astype(np.float64).copy()
    h = 1
    while h < block:
        v = y.reshape(-1, block // (2 * h), 2, h)
        y = np.stack((v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]), axis=2).reshape(-1, block)
        h *= 2
    return y / np.sqrt(block)


@pytest.mark.parametrize("block", [2, 64, 128, 256, 512, 2048, 4096, 32768])
def test_fwht_equals_the_butterfly(block):
    from agp.quant.rotation import fwht
    y = np.random.default_rng(block).standard_normal((3, 2 * block)).astype(np.float32)
    np.testing.assert_allclose(fwht(y, block), _butterfly(y, block).reshape(3, 2 * block), atol=2e-5)


def test_rotation_is_seeded():
    x = np.ones((1, 640), np.float32)
    assert np.array_equal(Rotation(640, 1).apply(x), Rotation(640, 1).apply(x))
    assert not np.allclose(Rotation(640, 1).apply(x), Rotation(640, 2).apply(x))


@pytest.mark.parametrize("dim", [640, 1536])
def test_block_hadamard_spreads_a_spike_across_blocks(dim):
    # one-hot input is the worst case: after rotation its energy must reach every block, with
    # coordinate variance ~1/d (otherwise the shared codebook is wrong for it)
    r = Rotation(dim, seed=0)
    y = r.apply(np.eye(dim, dtype=np.float32)[[0, dim // 2, dim - 1]])
    blocks = y.reshape(3, dim // r.block, r.block)
    assert (np.abs(blocks).sum(axis=2) > 0).all()
    assert np.abs(y.var(axis=1) * dim - 1).max() < 0.05
    assert np.abs(y).max() < 6 / np.sqrt(dim) * 2


def test_rotation_rejects_bad_input():
    with pytest.raises(AGPError, match="unknown rotation"):
        Rotation(8, kind="fourier")
    with pytest.raises(AGPError, match=r"\[N, 640\]"):
        Rotation(640).apply(np.zeros((2, 639)))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_gaussian_codebook_meets_the_paper_bound(bits):
    cb = lloyd_max.gaussian_codebook(bits, 640)
    assert cb.shape == (2**bits,) and cb.dtype == np.float32
    assert np.all(np.diff(cb) > 0) and np.allclose(cb, -cb[::-1])
    lo, hi = mse_bound(bits)
    mse = lloyd_max.codebook_mse(cb, 640) * 640  # per-vector MSE of a unit vector
    assert lo <= mse <= hi


def test_paper_table_values():
    # TurboQuant paper: D_mse ≈ 0.36, 0.117, 0.03, 0.009 for b = 1..4
    got = [lloyd_max.codebook_mse(lloyd_max.gaussian_codebook(b, 2048), 2048) * 2048 for b in (1, 2, 3, 4)]
    np.testing.assert_allclose(got, [0.36, 0.117, 0.03, 0.009], rtol=0.16)


def test_fit_codebook_recovers_gaussian_levels():
    s = np.random.default_rng(0).standard_normal(200_000) / np.sqrt(640)
    np.testing.assert_allclose(lloyd_max.fit_codebook(s, 2), lloyd_max.gaussian_codebook(2, 640), rtol=0.03)
    with pytest.raises(AGPError):
        lloyd_max.fit_codebook(np.array([np.nan]), 2)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
def test_quantize_picks_nearest_level(bits):
    cb = lloyd_max.gaussian_codebook(bits, 64)
    x = np.random.default_rng(1).standard_normal((50, 64)).astype(np.float32) / 8
    x[0, :4] = lloyd_max.boundaries(cb)[:4]  # ties go to the lower level, as searchsorted(side="left")
    idx = lloyd_max.quantize(x, cb)
    assert idx.dtype == np.uint8 and idx.shape == x.shape
    assert np.array_equal(idx, np.searchsorted(lloyd_max.boundaries(cb), x))
    brute = np.abs(x[..., None] - cb).argmin(-1)
    assert np.array_equal(idx[1:], brute[1:])


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), n=st.integers(1, 4), d=st.integers(1, 70), data=st.data())
def test_bitpack_roundtrip(bits, n, d, data):
    idx = data.draw(hnp.arrays(np.uint8, (n, d), elements=st.integers(0, 2**bits - 1)))
    p = bitpack.pack(idx, bits)
    assert p.shape == (n, (d * bits + 7) // 8)
    assert np.array_equal(bitpack.unpack(p, bits, d), idx)


def test_bitpack_rejects_bad_input():
    with pytest.raises(AGPError, match="fit in 2 bits"):
        bitpack.pack(np.array([[4]], np.uint8), 2)
    with pytest.raises(AGPError, match="packed codes"):
        bitpack.unpack(np.zeros((1, 3), np.uint8), 4, 8)
    with pytest.raises(AGPError, match="bit width"):
        bitpack.pack(np.zeros((1, 1), np.uint8), 9)


@pytest.mark.parametrize("bits,rotation", [(2, "hadamard"), (3, "hadamard"), (4, "hadamard"), (8, "hadamard"),
                                           (2, "dense"), (4, "dense")])
def test_turboquant_mse_within_paper_bound(bits, rotation):
    x = np.random.default_rng(bits).standard_normal((300, 640)).astype(np.float32) * 3
    tq = TurboQuant(640, bits, seed=3, rotation=rotation)  # seed 3: the dense matrix is cached from above
    packed, norms = tq.encode_batch(x)
    assert packed.shape == (300, 640 * bits // 8) and packed.dtype == np.uint8
    xh = tq.decode_batch(packed, norms)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    mse = (((x - xh) / n) ** 2).sum(1).mean()
    assert mse <= mse_bound(bits)[1]


def test_turboquant_qjl_makes_inner_products_unbiased():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 128)).astype(np.float32)
    q = x[:1] + 0.5 * rng.standard_normal((1, 128)).astype(np.float32)
    true = (x @ q.T).ravel()
    for qjl, tol in ((False, None), (True, 0.01)):
        tq = TurboQuant(128, 2, seed=1, qjl=qjl)
        est = (tq.decode_batch(*tq.encode_batch(x)) @ q.T).ravel()
        ratio = float(np.sum(est * true) / np.sum(true * true))
        if qjl:
            assert abs(ratio - 1) < 0.05  # unbiased up to sampling noise
        else:
            assert ratio < 0.95  # the MSE quantizer shrinks inner products (known bias)


def test_turboquant_blob_roundtrip_and_zero_vector():
    x = np.zeros((2, 3, 640), np.float32)
    x[0, 1] = np.linspace(-1, 1, 640)
    tq = TurboQuant(640, 4)
    blob = tq.encode(x)
    out = decode_blob(blob)
    assert out.shape == x.shape and np.all(out[1] == 0)
    np.testing.assert_allclose(out, tq.decode(blob))
    assert tq.meta["scheme"] == "turboquant" and tq.meta["bits"] == 4
