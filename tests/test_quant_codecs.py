"""Single-array codecs: round trips (hypothesis), GGML parity for q8_0, bad blobs rejected by type."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from agp.quant.codec import CodecError, FP16, F32, Q8_0, write_header
from agp.quant.registry import blob_meta, check_blob, decode_any, make_codec
from agp.quant.turboquant import TurboQuant

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40), elements=finite))
def test_lossless_and_fp16_roundtrip(x):
    assert np.array_equal(decode_any(F32().encode(x)), x)
    out = FP16().decode(FP16().encode(x))
    assert out.shape == x.shape and out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), x, rtol=1e-3, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=70), elements=finite))
def test_q8_0_roundtrip_error_is_half_a_step(x):
    blob = Q8_0().encode(x)
    out = decode_any(blob)
    assert out.shape == x.shape
    # per block the error is at most half a quantization step d = amax/127 (+ fp16 rounding of d)
    rows = x.reshape(-1, x.shape[-1])
    pad = np.zeros((rows.shape[0], -(-rows.shape[1] // 32) * 32), np.float32)
    pad[:, : rows.shape[1]] = rows
    amax = np.abs(pad.reshape(rows.shape[0], -1, 32)).max(-1, keepdims=True).astype(np.float64)
    d = amax / 127
    d16 = d.astype(np.float16).astype(np.float64)  # the stored scale (may round, or underflow to 0)
    bound = np.repeat(0.5 * d + 127 * np.abs(d - d16) + 1e-30, 32, -1).reshape(pad.shape)[:, : rows.shape[1]]
    assert np.all(np.abs(out.reshape(rows.shape).astype(np.float64) - rows) <= bound * 1.0001)


def test_q8_0_is_byte_identical_to_gguf():
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    x = np.random.default_rng(0).standard_normal((4, 640)).astype(np.float32) * 7
    blob = Q8_0().encode(x)
    ref = gguf_quants.quantize(x, GGMLQuantizationType.Q8_0).tobytes()
    assert blob.endswith(ref) and len(blob) - len(ref) == 6  # 6-byte codec header, then GGML blocks
    np.testing.assert_array_equal(Q8_0().decode(blob), gguf_quants.dequantize(np.frombuffer(ref, np.uint8).reshape(4, -1), GGMLQuantizationType.Q8_0))


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), qjl=st.booleans(), n=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
       scale=st.floats(1e-3, 1e3))
def test_turboquant_blob_roundtrip(bits, qjl, n, seed, scale):
    x = np.random.default_rng(seed % 1000).standard_normal((n, 64)).astype(np.float32) * np.float32(scale)
    tq = TurboQuant(64, bits, seed=seed, qjl=qjl)
    blob = tq.encode(x)
    out = decode_any(blob)
    assert out.shape == x.shape and out.dtype == np.float32
    cos = (out * x).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(x, axis=1)
    assert cos.min() > {2: 0.75, 3: 0.9, 4: 0.97, 8: 0.999}[bits] - (0.15 if qjl else 0)
    assert blob_meta(blob)["shape"] == (n, 64)


def test_fp16_decode_is_zero_copy():
    blob = FP16().encode(np.ones((2, 640), np.float32))
    out = FP16().decode(blob)
    assert out.base is not None and not out.flags.writeable  # a view of the bytes, not a copy


def test_codecs_meta_and_registry():
    for name in ("f32", "fp16", "q8_0"):
        assert make_codec(name).meta["scheme"] == name
    tq = make_codec("turboquant", dim=640, bits=3, seed=7)
    assert tq.meta == {**tq.meta, "scheme": "turboquant", "version": 1, "bits": 3, "seed": 7, "padded_dim": 640}
    with pytest.raises(Exception, match="unknown codec"):
        make_codec("zstd")


@pytest.mark.parametrize("blob,reason", [
    (b"", "shorter than"),
    (b"\x09\x01\x01\x04", "unknown codec id"),
    (b"\x01\x01\x00", "dimensions"),
    (b"\x01\x01\x09\x01", "dimensions"),
    (b"\x01\x01\x01\xff\xff\xff\xff\xff\xff", "longer than"),
    (b"\x01\x01\x01\x80", "truncated"),
    (write_header(1, 1, (1 << 20, 1 << 20)), "absurd"),
    (write_header(1, 1, (4,)) + b"\x00" * 7, "implies 8"),
    (write_header(2, 1, (40,)) + b"\x00" * 34, "implies 68"),
    (write_header(3, 1, (640,)) + b"\x04", "truncated turboquant"),
    (write_header(3, 1, (640,)) + b"\x04\x80", "truncated turboquant seed"),
    (write_header(3, 1, (640,)) + b"\x04\xff\xff\xff\xff\x7f", "32 bits"),
    (write_header(3, 1, (640,)) + b"\x0f\0\0\0\0", "invalid turboquant flags"),
    (write_header(3, 2, (640,)) + b"\x04\0\0\0\0", "version 2"),
    (write_header(3, 1, (1 << 20,)) + b"\x04\0\0\0\0", "outside the supported range"),
    (write_header(3, 1, (640,)) + b"\x04\0" + b"\0" * 323, "implies 324"),
    (write_header(3, 1, (640,)) + b"\x04\0" + b"\xff\xff\xff\xff" + b"\0" * 320, "non-finite"),
    (write_header(1, 1, (2,)) + b"\0\0\0\x7c", "NaN/Inf"),                    # fp16 +inf
    (write_header(2, 1, (32,)) + b"\0\x7e" + b"\0" * 32, "NaN/Inf"),           # q8_0 scale NaN
])
def test_bad_blobs_are_rejected_with_reason(blob, reason):
    with pytest.raises(CodecError, match=reason):
        decode_any(blob)
    with pytest.raises(CodecError, match=reason):  # the validator the packet receiver runs agrees
        check_blob(blob)


def test_parameter_mismatch_is_rejected():
    blob = TurboQuant(640, 4, seed=1).encode(np.ones(640, np.float32))
    with pytest.raises(CodecError, match="do not match"):
        TurboQuant(640, 4, seed=2).decode(blob)
    with pytest.raises(CodecError, match="where fp16 was expected"):
        FP16().decode(blob)


def test_non_finite_input_is_refused():
    with pytest.raises(CodecError, match="NaN or Inf"):
        FP16().encode(np.array([1.0, np.nan], np.float32))


def test_centered_blob_roundtrip_and_mismatch():
    from agp.quant.turboquant import decode_blob
    mu = np.linspace(-100, 100, 64, dtype=np.float32)
    x = mu + np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    tq = TurboQuant(64, 4, center=mu)
    blob = tq.encode(x)
    assert len(blob) == len(TurboQuant(64, 4).encode(x)) + 2
    np.testing.assert_allclose(tq.decode(blob), decode_blob(blob, center=mu))
    assert ((tq.decode(blob) - x) ** 2).sum() / ((x - mu) ** 2).sum() < 0.02
    np.testing.assert_allclose(tq.decode_batch(*tq.encode_batch(x)), tq.decode(blob), rtol=1e-5, atol=1e-4)
    with pytest.raises(CodecError, match="decode it with that mean"):
        decode_any(blob)
    with pytest.raises(CodecError, match="the mean given"):
        decode_blob(blob, center=mu + 1)
    with pytest.raises(CodecError, match="centering mean has shape"):
        decode_blob(blob, center=mu[:10])
    with pytest.raises(CodecError, match="not centered"):
        decode_blob(TurboQuant(64, 4).encode(x), center=mu)
