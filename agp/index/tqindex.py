"""TurboQuant index: centre, rotate, per-coordinate Lloyd-Max codes; scan packed codes with FAISS fast-scan.

Encoding a unit row x: y = x - mean (the Gemma table's mean has norm ~0.45: centring removes the
shared direction the codes would otherwise spend bits on), z = R y (the seeded TurboQuant rotation,
agp.quant.rotation), code_j = nearest level of codebook_j (agp.index.encode.GridQuantizer). Codebook j is
one Lloyd-Max shape fitted to the standardised rotated coordinates, scaled by coordinate j's std,
so the codes match the data rather than the data-oblivious N(0, 1/d) codebook. A per-row fp16
scale a = <z, ẑ>/|ẑ|² (least-squares gain) corrects each row's reconstruction length.

Score estimate for a query q: <q, mean> + a * <R q, ẑ>. The packed rows are exactly FAISS's PQ code
layout for M = padded_dim/g sub-quantizers of g coordinates (g = 4 // bits for 1, 2, 4 bits), so the
scan runs in FAISS's 4-bit fast-scan (SIMD lookup tables) without decoding the base to floats; the
fast scan's 8-bit lookup tables are then corrected by re-scoring a short list exactly from the codes
(float tables and the scale). 8 bits scan the high nibble of each code (a 4-bit quantizer: groups of
16 consecutive levels) with the same fast scan and re-score a longer short list from the full codes;
3 bits use FAISS's plain PQ scan. The scan is split into one FAISS shard per thread, because FAISS's
fast scan parallelises over queries only (one query would use one core). Optional exact rerank uses
stored fp16/fp32 vectors. `scan="v1"` keeps the previous engine (one unsharded FAISS index, PQ scan at
8 bits) so `agp bench index` can print before and after in one run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from agp.config import ConfigMixin
from agp.errors import AGPError
from agp.index import encode, loader, snapshot
from agp.quant import bitpack, lloyd_max
from agp.quant.rotation import Rotation

BITS = (2, 3, 4, 8)
STORES = ("none", "fp16", "fp32")
SCANS = ("fast", "v1")
ENCODE_CHUNK = 16384
RESCORE_CHUNK = 64      # queries re-scored at a time: bounds the [chunk, short, pd] level array
MIN_SHARD_ROWS = 8192   # below this a shard's fixed cost outweighs a second thread


@dataclass
class IndexArgs(ConfigMixin):
    bits: int = 4            # bits per rotated coordinate (4 and 8; 2 and 3 as options)
    seed: int = 0            # rotation seed
    store: str = "none"      # keep vectors for exact rerank: none | fp16 | fp32
    fit_rows: int = 1024     # rows sampled to fit the codebook shape (x padded_dim coordinates each)
    centre: bool = True      # subtract the build set's mean before rotating
    scan: str = "fast"       # search engine: fast (sharded 4-bit fast scan) | v1 (the first engine, for comparison)


class TQIndex:
    """Inner-product top-k over TurboQuant-coded unit vectors."""

    def __init__(self, dim, bits, seed, mean, codebook, scale, codes, vectors=None, store="none", path=None,
                 scan="fast", layout=None):
        if scan not in SCANS:
            raise AGPError(f"index scan must be one of {SCANS}, got {scan!r}")
        self.dim, self.bits, self.seed, self.store, self.path = int(dim), int(bits), int(seed), store, path
        self.rotation = Rotation(self.dim, self.seed)
        self.padded_dim = self.rotation.padded_dim
        self.mean, self.codebook, self.scale, self.codes, self.vectors = mean, codebook, scale, codes, vectors
        self.code_bytes = bitpack.packed_size(self.padded_dim, self.bits)
        # flat offsets of each coordinate's codebook: a 1-D take is ~3x faster than [arange, idx] indexing
        self._flat_codebook = np.ascontiguousarray(codebook, dtype=np.float32).ravel()
        self._offsets = (np.arange(self.padded_dim, dtype=np.intp) << self.bits)
        self._rot_matrix = None
        self._quantizer = None
        self.scan = scan
        self._engine = None
        self._layout = layout   # FAISS fast-scan layout read from a snapshot (None: packed from codes)
        self._snapshot = None

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, src, args: IndexArgs | None = None) -> "TQIndex":
        """Fit mean and codebooks on `src` (array / .npy / .jsonl) and encode every row."""
        args = args or IndexArgs()
        if args.bits not in BITS:
            raise AGPError(f"index bits must be one of {BITS}, got {args.bits}")
        if args.scan not in SCANS:
            raise AGPError(f"index scan must be one of {SCANS}, got {args.scan!r}")
        if args.store not in STORES:
            raise AGPError(f"index store must be one of {STORES}, got {args.store!r}")
        if not 0 <= args.seed < 2**32:
            raise AGPError(f"index seed must be in 0..2**32-1 (it is stored as u32), got {args.seed}")
        x = loader.load_vectors(src)
        n, dim = x.shape
        rot = Rotation(dim, args.seed)
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32) if args.centre else np.zeros(dim, np.float32)
        rng = np.random.default_rng(args.seed)
        sample = rot.apply(x[np.sort(rng.choice(n, min(n, args.fit_rows), replace=False))] - mean)
        sd = np.maximum(sample.std(axis=0), 1e-12).astype(np.float32)
        shape = lloyd_max.fit_codebook(sample / sd, args.bits)
        codebook = (sd[:, None] * shape[None, :]).astype(np.float32)
        idx = cls(dim, args.bits, args.seed, mean, codebook, np.zeros(0, np.float16),
                  np.zeros((0, bitpack.packed_size(rot.padded_dim, args.bits)), np.uint8), store=args.store,
                  vectors=None if args.store == "none" else np.zeros((0, dim), _store_dtype(args.store)), scan=args.scan)
        idx._add_unit(x)
        idx.engine()   # the scan layout is built here, not on the first search
        return idx

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """[N, dim] -> [N, padded_dim]: the seeded rotation as one dense matmul. The Hadamard form
        (Rotation.apply) spends most of its time in permutation copies; the materialised matrix is
        the same linear map (float rounding aside) and runs in BLAS ~6x faster on 50 K rows."""
        if self._rot_matrix is None:
            self._rot_matrix = self.rotation.apply(np.eye(self.dim, dtype=np.float32))
        return np.asarray(x, dtype=np.float32) @ self._rot_matrix

    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(packed codes [N, code_bytes], row gains fp16 [N]) for unit rows x (agp.index.encode)."""
        if self._quantizer is None:
            self._quantizer = encode.GridQuantizer(self.codebook)
        self.rotate(x[:1])   # materialise the rotation matrix once, before the threads share it
        mean_rot = self.mean @ self._rot_matrix   # (x - mean) R = x R - mean R: one pass fewer

        def rotate(rows: np.ndarray) -> np.ndarray:
            z = self.rotate(rows)
            z -= mean_rot
            return z

        def finish(z: np.ndarray):
            idx, zh = self._quantizer(z)
            gain = np.einsum("nd,nd->n", z, zh) / np.maximum(np.einsum("nd,nd->n", zh, zh), 1e-30)
            return bitpack.pack(idx, self.bits), gain.astype(np.float16)

        parts = encode.encode_rows(x, rotate, finish)
        if not parts:
            return np.zeros((0, self.code_bytes), np.uint8), np.zeros(0, np.float16)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _quantize(self, z: np.ndarray) -> np.ndarray:
        """Nearest level index per coordinate (uint8): agp.index.encode.GridQuantizer, equal to
        counting the boundaries below each value."""
        if self._quantizer is None:
            self._quantizer = encode.GridQuantizer(self.codebook)
        return self._quantizer(z)[0]

    def _levels(self, idx: np.ndarray) -> np.ndarray:
        return np.take(self._flat_codebook, idx.astype(np.intp) + self._offsets)

    def _add_unit(self, x: np.ndarray) -> None:
        codes, scales = self._encode(x)
        self.codes = np.concatenate([self.codes, codes]) if len(self.codes) else codes
        self.scale = np.concatenate([self.scale, scales]) if len(self.scale) else scales
        if self.store != "none":
            v = x.astype(_store_dtype(self.store))
            self.vectors = np.concatenate([self.vectors, v]) if len(self.vectors) else v
        self._engine = self._layout = None

    def add(self, src) -> int:
        """Encode more rows with the existing mean and codebooks; returns the new count."""
        self._add_unit(loader.load_vectors(src, self.dim))
        return len(self)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def bytes_per_vector(self) -> float:
        """Bytes a vector costs in the scan (codes + scale), excluding the optional rerank store."""
        return self.code_bytes + 2

    # -- the scan engine ----------------------------------------------------------------------
    def _group(self) -> int:
        return 4 // self.bits if self.bits in (1, 2, 4) and self.padded_dim % (4 // self.bits) == 0 else 1

    def engine(self):
        """The scan over the codes, built once (at build, at open, or on the first search after an add)."""
        if self._engine is None:
            self._engine = _V1Scan(self) if self.scan == "v1" else _FastScan(self, self._layout)
        return self._engine

    def _sub_centroids(self, g: int, codebook: np.ndarray | None = None, bits: int | None = None) -> np.ndarray:
        """[M, 2**(bits*g), g] centroids: the product of g per-coordinate codebooks (code = c0 + c1<<bits ...)."""
        codebook = self.codebook if codebook is None else codebook
        bits = self.bits if bits is None else bits
        k = 1 << bits
        cb = codebook.reshape(self.padded_dim // g, g, k)
        v = np.arange(k ** g)
        digits = (v[:, None] >> (bits * np.arange(g))[None, :]) & (k - 1)  # [k^g, g]
        return np.stack([cb[:, i, digits[:, i]] for i in range(g)], axis=-1).astype(np.float32)

    def _faiss_pq(self, centroids: np.ndarray, codes: np.ndarray, g: int, bits: int):
        """A FAISS PQ index over `codes` (FAISS's PQ code layout) with the given sub-centroids; fast
        scan when each sub-quantizer has 4 bits."""
        m, nbits = self.padded_dim // g, bits * g
        pq = faiss.IndexPQ(self.padded_dim, m, nbits, faiss.METRIC_INNER_PRODUCT)
        faiss.copy_array_to_vector(centroids.ravel(), pq.pq.centroids)
        pq.is_trained = True
        if len(codes):
            faiss.copy_array_to_vector(np.ascontiguousarray(codes).ravel(), pq.codes)
        pq.ntotal = len(codes)
        return faiss.IndexPQFastScan(pq) if nbits == 4 else pq

    # -- search -------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, rescore: int | None = None, rerank: int = 0):
        """Top-k by inner product: returns (scores [nq, k] float32, ids [nq, k] int64; -1 pads).

        `rescore` short-list size re-scored from the codes with float tables and row scales
        (default max(4k, 64); max(16k, 256) when 8-bit codes are ranked by their high nibbles); `rerank` > 0 re-scores that many candidates exactly with the stored
        vectors (needs store fp16/fp32).
        """
        q = loader.check_rows(queries, "query", self.dim)
        _check_search_sizes(k, rerank, rescore)
        if rerank and self.vectors is None:
            raise AGPError("rerank needs stored vectors; build the index with --store fp16 or fp32")
        n, nq = len(self), len(q)
        if n == 0:
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        # rerank takes the best `rerank` by the code estimate out of a 2x wider fast-scan list: the
        # fast scan's 8-bit tables would otherwise decide the rerank candidates on their own
        short = min(n, max(k, rescore if rescore is not None else self.engine().default_short(k), 2 * rerank))
        zq = self.rotate(q)
        cand = self._candidates(zq, short)   # FAISS: one call for the whole batch, all threads

        def rank(lo: int, hi: int):
            return self._rank(q[lo:hi], zq[lo:hi], cand[lo:hi], k, rerank)

        # the re-score and rerank are NumPy passes on one core each: query chunks go to a thread pool
        parts = encode.map_chunks(rank, nq, RESCORE_CHUNK)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _rank(self, q: np.ndarray, zq: np.ndarray, cand: np.ndarray, k: int, rerank: int):
        """Top-k of each query's candidates: code re-score (float tables x row gain), optional exact rerank."""
        valid = cand >= 0
        cand = np.where(valid, cand, 0)   # a placeholder row to index with; its score is -inf below
        scores = self._rescore(zq, cand) + (q @ self.mean)[:, None]
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        cand, scores = np.take_along_axis(cand, order, 1), np.take_along_axis(scores, order, 1)
        if rerank:
            cand, scores = cand[:, :rerank], scores[:, :rerank]
            scores = np.where(np.isfinite(scores),
                              np.einsum("qkd,qd->qk", self.vectors[cand].astype(np.float32), q), -np.inf)
            order = np.argsort(-scores, axis=1, kind="stable")
            cand, scores = np.take_along_axis(cand, order, 1), np.take_along_axis(scores, order, 1)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        kk = min(k, cand.shape[1])
        out_s[:, :kk], out_i[:, :kk] = scores[:, :kk], cand[:, :kk]
        out_i[~np.isfinite(out_s)] = -1   # a slot the scan could not fill is a pad, never a repeat of row 0
        return out_s, out_i

    def _candidates(self, zq: np.ndarray, short: int) -> np.ndarray:
        """[nq, short] candidate rows (-1 = none). When the short list covers the whole index every
        row is a candidate: the fast scan returns -1 for rows it cannot rank (e.g. identical rows,
        whose centred codes are all zero), and those must still be returned, each once. Ties in
        the exact re-score then keep ascending row order (stable sort)."""
        n = len(self)
        if short >= n:
            return np.broadcast_to(np.arange(n, dtype=np.int64), (len(zq), n)).copy()
        return self.engine().candidates(zq, short)

    def _rescore(self, zq: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """[nq, short] code-estimated scores <R q, a * zhat> of the candidate rows (float tables)."""
        scores = np.empty(cand.shape, np.float32)
        for i in range(0, len(zq), RESCORE_CHUNK):
            c = cand[i:i + RESCORE_CHUNK]
            lv = self._levels(bitpack.unpack(self.codes[c.ravel()], self.bits, self.padded_dim)).reshape(*c.shape, -1)
            scores[i:i + RESCORE_CHUNK] = np.einsum("qkd,qd->qk", lv, zq[i:i + RESCORE_CHUNK]) * self.scale[c].astype(np.float32)
        return scores

    # -- snapshot -----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the `.tqidx` snapshot atomically."""
        arrays = {"mean": self.mean, "codebook": self.codebook, "scale": self.scale, "codes": self.codes}
        if self.vectors is not None:
            arrays["vectors"] = self.vectors
        engine = self.engine()
        layout = engine.layout() if isinstance(engine, _FastScan) else None
        if layout is not None:   # stored so that open does not re-pack the codes (format version 2)
            arrays["fastscan"] = layout
        snapshot.write(path, {"dim": self.dim, "padded_dim": self.padded_dim, "bits": self.bits, "seed": self.seed,
                              "rotation": self.rotation.kind, "count": len(self), "store": self.store,
                              "code_bytes": self.code_bytes, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                       arrays)

    @classmethod
    def open(cls, path, verify: bool = True) -> "TQIndex":
        """Open a snapshot: arrays are read-only views into a memory map (no copy)."""
        snap = snapshot.Snapshot(path, verify=verify)
        m, a = snap.meta, snap.arrays
        try:
            dim, pd, bits = int(m["dim"]), int(m["padded_dim"]), int(m["bits"])
            if bits not in BITS or Rotation.padded_dim_for(dim) != pd or m.get("rotation", "hadamard") != "hadamard":
                raise ValueError("bits / padded_dim / rotation")
            n, seed = int(m["count"]), int(m["seed"])
            if not 0 <= seed < 2**32:
                raise ValueError(f"seed {seed}")
            ok = (a["mean"].shape == (dim,) and a["codebook"].shape == (pd, 1 << bits) and a["scale"].shape == (n,)
                  and a["codes"].shape == (n, bitpack.packed_size(pd, bits)))
            if not ok or (m["store"] != "none") != ("vectors" in a):
                raise ValueError("section shapes")
            g = 1 if bits == 8 else (4 // bits if bits in (1, 2, 4) and pd % (4 // bits) == 0 else 0)
            if "fastscan" in a and (not g or a["fastscan"].shape != (layout_bytes(n, pd // g),)):
                raise ValueError("fastscan layout size")
        except (KeyError, ValueError, TypeError) as e:
            raise AGPError(f"{path}: snapshot header is inconsistent ({e}); rebuild it") from None
        idx = cls(dim, bits, seed, a["mean"], a["codebook"], a["scale"], a["codes"], a.get("vectors"),
                  store=m["store"], path=str(path), layout=a.get("fastscan"))
        idx._snapshot = snap
        return idx

    def info(self) -> dict:
        """Vectors, dimension, bits, bytes and the compression ratio versus fp32."""
        return {"vectors": len(self), "dim": self.dim, "padded_dim": self.padded_dim, "bits": self.bits,
                "seed": self.seed, "store": self.store, "bytes_per_vector": self.bytes_per_vector,
                "compression_vs_fp32": round(4 * self.dim / self.bytes_per_vector, 2)}


class _V1Scan:
    """The first engine (kept for before/after comparison): one unsharded FAISS index over the packed
    codes, fast scan at 1/2/4 bits, FAISS's plain PQ scan (one float lookup per code) at 3 and 8."""

    def __init__(self, idx: TQIndex):
        g = idx._group()
        self.index = idx._faiss_pq(idx._sub_centroids(g), idx.codes, g, idx.bits)

    def default_short(self, k: int) -> int:
        return max(4 * k, 64)

    def candidates(self, zq: np.ndarray, short: int) -> np.ndarray:
        return self.index.search(zq, short)[1]


class _FastScan:
    """4-bit fast scan over the codes, one FAISS shard per thread.

    1, 2, 4 bits: the packed codes are the fast-scan codes. 8 bits: the high nibble of every code is a
    4-bit code (levels 16c..16c+15 form coarse cell c, its level their mean); the fast scan ranks on
    those and the short list, 4x longer, is re-scored from the full 8-bit codes. 3 bits: PQ scan.
    FAISS's fast scan parallelises over queries, so a single query would run on one core: the rows
    are split into contiguous shards, searched by one thread each (IndexShards, threaded) for fewer
    queries than threads, and one after the other, each on all threads, for a batch.
    """

    def __init__(self, idx: TQIndex, layout: np.ndarray | None = None):
        self.coarse = idx.bits == 8
        g, bits = (1, 4) if self.coarse else (idx._group(), idx.bits)
        cb = idx.codebook.reshape(idx.padded_dim, 16, 16).mean(axis=2) if self.coarse else idx.codebook
        cent = idx._sub_centroids(g, cb, bits)
        self.fast = g * bits == 4   # FAISS fast scan (a blocked layout exists); 3 bits: PQ scan
        self.threads = max(1, faiss.omp_get_max_threads())
        cuts = _shard_cuts(len(idx), self.threads)
        spans = list(zip(cuts[:-1], cuts[1:]))
        if layout is not None and self.fast:
            blk = layout_block_bytes(idx.padded_dim // g)
            self.shards = [_from_layout(idx, cent, layout[a // BBS * blk:-(-b // BBS) * blk], b - a, g, bits)
                           for a, b in spans]
        else:
            codes = bitpack.pack(_high_nibbles(idx.codes), 4) if self.coarse and len(idx) else idx.codes
            if self.coarse and not len(idx):
                codes = np.zeros((0, idx.padded_dim // 2), np.uint8)
            self.shards = [idx._faiss_pq(cent, codes[a:b], g, bits) for a, b in spans]
        self.parallel = faiss.IndexShards(idx.padded_dim, True, True)     # threaded: one thread per shard
        self.sequential = faiss.IndexShards(idx.padded_dim, False, True)  # each shard on all threads
        for sh in self.shards:   # the wrappers do not own the shards: self.shards keeps them alive
            self.parallel.add_shard(sh)
            self.sequential.add_shard(sh)

    def layout(self) -> np.ndarray | None:
        """The shards' FAISS blocked codes, concatenated: the whole index's layout, because every
        shard but the last holds a multiple of BBS rows (None for the 3-bit PQ scan)."""
        if not self.fast:
            return None
        parts = [np.array(faiss.rev_swig_ptr(sh.codes.get(), sh.codes.size())) for sh in self.shards if sh.codes.size()]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    def default_short(self, k: int) -> int:
        return max(16 * k, 256) if self.coarse else max(4 * k, 64)

    def candidates(self, zq: np.ndarray, short: int) -> np.ndarray:
        if len(self.shards) == 1:
            return self.shards[0].search(zq, short)[1]
        index = self.parallel if len(zq) < self.threads else self.sequential
        return index.search(zq, short)[1]


BBS = 32   # FAISS fast-scan block: rows packed together (IndexPQFastScan's default bbs)


def layout_block_bytes(m: int) -> int:
    """Bytes of one BBS-row block of FAISS's fast-scan layout for m 4-bit sub-quantizers (m rounded up to even)."""
    return BBS * (m + m % 2) // 2


def layout_bytes(n: int, m: int) -> int:
    return -(-n // BBS) * layout_block_bytes(m)


def _shard_cuts(n: int, threads: int) -> np.ndarray:
    """Row cuts of one shard per thread (at least MIN_SHARD_ROWS rows each), on BBS-row block
    boundaries so that each shard's layout is a slice of the whole index's layout."""
    n_sh = max(1, min(threads, n // MIN_SHARD_ROWS))
    cuts = np.linspace(0, n, n_sh + 1).astype(np.int64) // BBS * BBS
    cuts[-1] = n
    return cuts


def _from_layout(idx: "TQIndex", cent: np.ndarray, layout: np.ndarray, rows: int, g: int, bits: int):
    """A fast-scan shard whose blocked codes are copied from a stored layout (no re-packing)."""
    sh = idx._faiss_pq(cent, np.zeros((0, layout_block_bytes(idx.padded_dim // g) // BBS), np.uint8), g, bits)
    sh.codes.resize(layout.size)
    if layout.size:
        faiss.rev_swig_ptr(sh.codes.get(), layout.size)[:] = layout
    sh.ntotal, sh.ntotal2 = int(rows), -(-int(rows) // BBS) * BBS
    return sh


def _high_nibbles(codes: np.ndarray) -> np.ndarray:
    """[N, pd] 8-bit codes -> [N, pd] 4-bit coarse codes, in chunks (the codes may be a memory map)."""
    return np.concatenate([codes[i:i + ENCODE_CHUNK] >> 4 for i in range(0, len(codes), ENCODE_CHUNK)])


MAX_RESULTS = 1 << 20   # k / rescore / rerank above this would allocate [queries, k] beyond reason


def _check_search_sizes(k: int, rerank: int, rescore: int | None) -> None:
    for name, value in (("k", k), ("rerank", rerank), ("rescore", rescore if rescore is not None else 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise AGPError(f"{name} must be an integer, got {value!r}")
        if value > MAX_RESULTS:
            raise AGPError(f"{name} = {value} is more than {MAX_RESULTS} results per query; ask for fewer")
    if k < 1:
        raise AGPError(f"k must be >= 1, got {k}")
    if rerank < 0 or (rescore is not None and rescore < 1):
        raise AGPError(f"rerank must be >= 0 and rescore >= 1, got rerank {rerank}, rescore {rescore}")
    if 0 < rerank < k:
        raise AGPError(f"rerank {rerank} is less than k {k}: it would return only {rerank} results; "
                       f"use --rerank 0 or a value >= k")


def check_output(out, inputs=(), force: bool = False) -> Path:
    """The snapshot path to write, refused when writing it would destroy a file AGP did not write:
    an input of the same command, a directory, or (without `force`) an existing non-.tqidx file."""
    if not str(out).strip():
        raise AGPError("the snapshot path is empty; name the .tqidx file to write")
    path = Path(out)
    for src in inputs:
        if isinstance(src, (str, Path)) and _same_file(path, Path(src)):
            raise AGPError(f"{out} is also the input {src}; writing the snapshot would overwrite it, "
                           f"choose another output path (e.g. {path.with_suffix('.tqidx')})")
    if path.is_dir():
        raise AGPError(f"{out} is a directory; give a file path for the snapshot (e.g. {path / 'index.tqidx'})")
    if path.exists() and not force and not snapshot.is_snapshot(path):
        raise AGPError(f"{out} exists and is not a .tqidx snapshot; choose another path, or pass --force to replace it")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _store_dtype(store: str):
    return np.float16 if store == "fp16" else np.float32


def append(path, src) -> int:
    """Append rows to a snapshot (encoded with its mean and codebooks); rewrites it atomically."""
    idx = TQIndex.open(path)
    x = loader.load_vectors(src, idx.dim)
    mem = TQIndex(idx.dim, idx.bits, idx.seed, np.array(idx.mean), np.array(idx.codebook), np.array(idx.scale),
                  np.array(idx.codes), None if idx.vectors is None else np.array(idx.vectors), store=idx.store)
    idx._snapshot.close()
    del idx
    mem._add_unit(x)
    mem.save(path)
    return len(mem)
