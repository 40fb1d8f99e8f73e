"""Unit and property tests for the TurboQuant index: search, snapshot round trip, append, bad input."""
from __future__ import annotations

import json
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agp.cli import main
from agp.errors import AGPError
from agp.index import IndexArgs, TQIndex, snapshot
from agp.index.loader import load_vectors
from agp.index.tqindex import append


def _data(n=3000, d=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32) + 0.4  # anisotropic, like the real table
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(ids, x, q, k=10):
    gt = np.argsort(-(q @ x.T), axis=1)[:, :k]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, gt)])


@pytest.fixture(scope="module")
def built():
    x = _data()
    return x, TQIndex.build(x, IndexArgs(bits=4, store="fp16"))


def test_recall_and_rerank(built):
    x, idx = built
    q = x[:50]
    s, i = idx.search(q, 10)
    assert _recall(i, x, q) > 0.7
    assert np.all(np.diff(s, axis=1) <= 1e-6)  # scores sorted descending
    _, i2 = idx.search(q, 10, rerank=100)
    assert _recall(i2, x, q) > 0.97


def test_scores_estimate_inner_products(built):
    x, idx = built
    s, i = idx.search(x[:20], 5)
    exact = np.einsum("qkd,qd->qk", x[i], x[:20])
    assert np.abs(s - exact).max() < 0.1


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths(bits):
    x = _data(1500)
    idx = TQIndex.build(x, IndexArgs(bits=bits))
    assert idx.code_bytes == 64 * bits // 8
    _, i = idx.search(x[:30], 10)
    assert _recall(i, x, x[:30]) > {2: 0.4, 3: 0.6, 8: 0.9}[bits]


def test_snapshot_round_trip_identical(built, tmp_path):
    x, idx = built
    p = tmp_path / "a.tqidx"
    idx.save(p)
    o = TQIndex.open(p)
    assert not o.codes.flags.writeable and not o.codes.flags.owndata  # a view into the map, not a copy
    for kw in ({}, {"rerank": 50}):
        a, b = idx.search(x[:40], 10, **kw), o.search(x[:40], 10, **kw)
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])


def test_append_matches_single_build_encoding(tmp_path):
    x = _data(2000)
    idx = TQIndex.build(x[:1500], IndexArgs())
    p = tmp_path / "a.tqidx"
    idx.save(p)
    assert append(p, x[1500:]) == 2000
    o = TQIndex.open(p)
    ref = TQIndex.build(x[:1500], IndexArgs())
    ref.add(x[1500:])
    assert np.array_equal(np.asarray(o.codes), ref.codes)
    assert np.array_equal(o.search(x[:10], 5)[1], ref.search(x[:10], 5)[1])


def test_empty_and_small_k(built):
    x, idx = built
    s, i = TQIndex.build(x[:3], IndexArgs()).search(x[:2], 10)
    assert (i[:, 3:] == -1).all() and (i[:, :3] >= 0).all()
    with pytest.raises(AGPError, match="k must be"):
        idx.search(x[:1], 0)
    with pytest.raises(AGPError, match="rerank needs stored vectors"):
        TQIndex.build(x[:100], IndexArgs()).search(x[:1], 5, rerank=10)


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 80), st.sampled_from([2, 4, 8]), st.integers(0, 2**16))
def test_property_round_trip_any_shape(d, bits, seed):
    x = _data(40, d, seed)
    idx = TQIndex.build(x, IndexArgs(bits=bits, seed=seed))
    with tempfile.TemporaryDirectory() as t:
        p = os.path.join(t, "p.tqidx")
        idx.save(p)
        o = TQIndex.open(p)
        assert np.array_equal(o.search(x[:5], 3)[1], idx.search(x[:5], 3)[1])
        assert o.info()["vectors"] == 40


# -- bad input ------------------------------------------------------------------------------------

JSONL_BAD = [
    ('[1, 2, 3]\n{"embedding": [1, 2]}\n', r"v.jsonl:2: ragged row"),
    ('[1, 2]\n{"vector": [1, NaN]}\n', r"row 1 contains NaN or inf"),
    ('{"text": "x"}\n', r"v.jsonl:1: object has none of the keys"),
    ('[1, "a"]\n', r"v.jsonl:1: the vector must be"),
    ("not json\n", r"v.jsonl:1: not valid JSON"),
    ("", "empty file"),
]
NPY_BAD = [
    (np.array([[1.0, 2.0], [np.inf, 0.0]], np.float32), None, r"v.npy: row 1 contains NaN or inf"),
    (np.zeros((2, 2), np.float32), None, "row 0 is all zeros"),
    (np.ones((3, 5), np.float32), 4, "dimension 5, the index has 4"),
    (np.zeros((0, 4), np.float32), None, "no vectors"),
]


@pytest.mark.parametrize("text,pattern", JSONL_BAD)
def test_jsonl_errors_name_file_and_row(tmp_path, text, pattern):
    p = tmp_path / "v.jsonl"
    p.write_text(text)
    with pytest.raises(AGPError, match=pattern):
        load_vectors(p)


@pytest.mark.parametrize("arr,dim,pattern", NPY_BAD)
def test_npy_errors_name_file_and_row(tmp_path, arr, dim, pattern):
    p = tmp_path / "v.npy"
    np.save(p, arr)
    with pytest.raises(AGPError, match=pattern):
        load_vectors(p, dim=dim)


def test_unknown_file_type(tmp_path):
    with pytest.raises(AGPError, match="unknown vector file type"):
        load_vectors(_touch(tmp_path / "v.csv"))


def _touch(p):
    p.write_text("1,2\n")
    return p


def test_query_wrong_dim(built):
    _, idx = built
    with pytest.raises(AGPError, match="dimension 3, the index has 64"):
        idx.search(np.ones((1, 3), np.float32), 5)


def _saved(tmp_path):
    x = _data(3000, 128)
    p = tmp_path / "s.tqidx"
    TQIndex.build(x, IndexArgs(store="fp32")).save(p)  # > 1 MiB: several checksum blocks
    return p, bytearray(p.read_bytes())


def test_truncated_snapshot(tmp_path):
    p, b = _saved(tmp_path)
    p.write_bytes(bytes(b[: len(b) - 100]))
    with pytest.raises(AGPError, match="truncated snapshot"):
        TQIndex.open(p)
    p.write_bytes(bytes(b[:10]))
    with pytest.raises(AGPError, match="truncated"):
        TQIndex.open(p)


def test_corrupted_snapshot_names_section_and_offset(tmp_path):
    p, b = _saved(tmp_path)
    o = TQIndex.open(p)
    sec = o._snapshot.meta["sections"]["vectors"]
    at = o._snapshot.start + sec["offset"] + (1 << 20) + 7  # second block of the vectors
    o._snapshot.close()
    del o
    b[at] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(AGPError, match=r"checksum mismatch in section 'vectors' block 1 \(bytes \d+"):
        TQIndex.open(p)


def test_header_corruption_and_newer_version(tmp_path):
    p, b = _saved(tmp_path)
    c = bytearray(b)
    c[30] ^= 0x01
    p.write_bytes(bytes(c))
    with pytest.raises(AGPError, match="header checksum mismatch"):
        TQIndex.open(p)
    c = bytearray(b)
    c[8:12] = struct.pack("<I", snapshot.VERSION + 1)
    p.write_bytes(bytes(c))
    with pytest.raises(AGPError, match="newer than this agp reads"):
        TQIndex.open(p)
    p.write_bytes(b"NOTANIDX" + bytes(b[8:]))
    with pytest.raises(AGPError, match="bad magic"):
        TQIndex.open(p)


# -- command line ---------------------------------------------------------------------------------

def test_cli_build_search_inspect_append(tmp_path, capsys):
    x = _data(800, 32)
    np.save(tmp_path / "v.npy", x[:700])
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"embedding": r.tolist()}) + "\n" for r in x[:3]))
    np.save(tmp_path / "more.npy", x[700:])
    ix = str(tmp_path / "v.tqidx")
    assert main(["index", "build", str(tmp_path / "v.npy"), ix, "--store", "fp16"]) == 0
    assert main(["index", "search", ix, str(tmp_path / "q.jsonl"), "-k", "3", "--rerank", "20"]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()[1:]]
    assert [r["ids"][0] for r in lines] == [0, 1, 2]
    assert main(["index", "append", ix, str(tmp_path / "more.npy")]) == 0
    assert main(["index", "inspect", ix]) == 0
    out = capsys.readouterr().out
    assert "vectors: 800" in out and "compression_vs_fp32" in out
    np.save(tmp_path / "bad.npy", np.ones((2, 5), np.float32))
    assert main(["index", "append", ix, str(tmp_path / "bad.npy")]) == 2
    assert "dimension 5, the index has 32" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_quantize_matches_binary_search(bits):
    from agp.index.encode import GridQuantizer

    x = _data(800)
    idx = TQIndex.build(x, IndexArgs(bits=bits))
    z = idx.rotate(x - idx.mean)
    b = idx._quantizer.bounds.T
    z[:len(b)] = b   # values exactly on a boundary: strict "below" counts
    gq = GridQuantizer(idx.codebook)
    assert gq.tables is not None   # the grid path, not the counting fallback
    brute = np.stack([np.searchsorted(gq.bounds[j], z[:, j]) for j in range(idx.padded_dim)], axis=1)
    codes, levels = gq(z)
    assert np.array_equal(codes, brute)
    assert np.array_equal(levels, np.take_along_axis(idx.codebook.T, brute, axis=0))


def test_grid_quantize_coincident_levels_falls_back_to_counting():
    from agp.index.encode import GridQuantizer

    z = np.array([[-2, 0, 5e-10, 2], [0.5, -0.5, 1e-9, 0], [0, 0, 0, 0]], np.float32)
    for levels in ([-1.0, 0.0, 0.0, 1e-9, 1.0], [-1.0, 0.0, 0.0, 0.0, 1.0]):   # 1e-9 apart; 3 equal levels
        cb = np.tile(np.array(levels, np.float32), (4, 1))
        gq = GridQuantizer(cb)
        brute = np.stack([np.searchsorted(gq.bounds[j], z[:, j]) for j in range(4)], axis=1)
        assert gq.tables is None and np.array_equal(gq(z)[0], brute)
        assert np.array_equal(gq(z)[1], np.take_along_axis(cb.T, brute, axis=0))


def test_dense_rotation_is_the_hadamard_rotation():
    x = _data(200, d=48)   # 48 pads to 64: the dense map must keep the padded coordinates
    idx = TQIndex.build(x, IndexArgs(bits=4))
    assert np.allclose(idx.rotate(x), idx.rotation.apply(x), atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_sharded_fast_scan_matches_v1_engine(bits):
    import faiss

    from agp.index import tqindex

    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        x = _data(2 * tqindex.MIN_SHARD_ROWS + 500, d=64, seed=3)
        fast = TQIndex.build(x, IndexArgs(bits=bits))
        v1 = TQIndex.build(x, IndexArgs(bits=bits, scan="v1"))
        assert len(fast.engine().shards) == 2
        q = _data(60, d=64, seed=4)
        one_by_one = np.concatenate([fast.search(q[i:i + 1], 10)[1] for i in range(len(q))])  # threaded shards
        r_fast = [_recall(one_by_one, x, q), _recall(fast.search(q, 10)[1], x, q)]             # sequential shards
        r_v1 = _recall(v1.search(q, 10)[1], x, q)
        assert min(r_fast) >= r_v1 - 0.05 and r_v1 > 0.6, (r_fast, r_v1)
        # shard ids are global: the candidates of a one-query (threaded) and a batch search agree
        assert np.array_equal(fast.search(q[:1], 10)[1], fast.search(q[:5], 10)[1][:1])
    finally:
        faiss.omp_set_num_threads(old)


def test_unknown_scan_is_refused():
    with pytest.raises(AGPError, match="scan must be one of"):
        TQIndex.build(_data(100), IndexArgs(scan="gpu"))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_snapshot_stores_fast_scan_layout(bits, tmp_path):
    import faiss

    from agp.index import tqindex

    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        x = _data(2 * tqindex.MIN_SHARD_ROWS + 77, d=64, seed=5)   # two shards, a partial last block
        idx = TQIndex.build(x, IndexArgs(bits=bits))
        p = tmp_path / "a.tqidx"
        idx.save(p)
        o = TQIndex.open(p)
        assert o._layout is not None and len(o.engine().shards) == 2
        faiss.omp_set_num_threads(1)   # a different shard split reads the same stored layout
        one = TQIndex.open(p)
        assert len(one.engine().shards) == 1
        faiss.omp_set_num_threads(2)
        q = _data(30, d=64, seed=6)
        for other in (o, one):
            for qq in (q, q[:1]):
                a, b = idx.search(qq, 10), other.search(qq, 10)
                assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    finally:
        faiss.omp_set_num_threads(old)


def test_version1_snapshot_still_opens(built, tmp_path):
    x, idx = built
    p = tmp_path / "v1.tqidx"
    arrays = {"mean": idx.mean, "codebook": idx.codebook, "scale": idx.scale, "codes": idx.codes, "vectors": idx.vectors}
    meta = {"dim": idx.dim, "padded_dim": idx.padded_dim, "bits": idx.bits, "seed": idx.seed, "rotation": "hadamard",
            "count": len(idx), "store": idx.store, "code_bytes": idx.code_bytes}
    snapshot.write(p, meta, arrays)
    raw = bytearray(p.read_bytes())
    raw[8:12] = struct.pack("<I", 1)   # the version field is outside the header checksum
    p.write_bytes(bytes(raw))
    o = TQIndex.open(p)
    assert o._layout is None
    a, b = idx.search(x[:20], 10), o.search(x[:20], 10)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])


def test_wrong_size_fast_scan_layout_is_refused(built, tmp_path):
    x, idx = built
    p = tmp_path / "bad.tqidx"
    arrays = {"mean": idx.mean, "codebook": idx.codebook, "scale": idx.scale, "codes": idx.codes,
              "vectors": idx.vectors, "fastscan": np.zeros(100, np.uint8)}
    meta = {"dim": idx.dim, "padded_dim": idx.padded_dim, "bits": idx.bits, "seed": idx.seed, "rotation": "hadamard",
            "count": len(idx), "store": idx.store, "code_bytes": idx.code_bytes}
    snapshot.write(p, meta, arrays)
    with pytest.raises(AGPError, match="fastscan layout size.*rebuild it"):
        TQIndex.open(p)


@pytest.mark.parametrize("bits", [4, 8])
def test_fast_encode_matches_reference_encoding(bits):
    """The threaded grid encoder against the plain reference (Hadamard rotation of x - mean, binary
    search per coordinate, least-squares gain): the mean is folded into a rotated bias, so float
    rounding may move a value sitting on a boundary; codes agree on >= 99.9% and recall matches."""
    x = _data(3000)
    idx = TQIndex.build(x, IndexArgs(bits=bits))
    z = idx.rotation.apply(x - idx.mean)
    bounds = (idx.codebook[:, 1:] + idx.codebook[:, :-1]) * np.float32(0.5)
    ref = np.stack([np.searchsorted(bounds[j], z[:, j]) for j in range(idx.padded_dim)], axis=1).astype(np.uint8)
    from agp.quant import bitpack

    codes = bitpack.unpack(idx.codes, bits, idx.padded_dim)
    assert (codes == ref).mean() >= 0.999
    zh = np.take_along_axis(idx.codebook.T, ref.astype(np.intp), axis=0)
    gain = (z * zh).sum(1) / (zh * zh).sum(1)
    assert np.allclose(idx.scale.astype(np.float32), gain, rtol=2e-3)
    q = _data(60, seed=9)
    ref_idx = TQIndex(idx.dim, bits, idx.seed, idx.mean, idx.codebook, gain.astype(np.float16), bitpack.pack(ref, bits))
    r_new, r_ref = _recall(idx.search(q, 10)[1], x, q), _recall(ref_idx.search(q, 10)[1], x, q)
    assert abs(r_new - r_ref) <= 0.01, (r_new, r_ref)
