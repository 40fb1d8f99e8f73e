"""TurboQuant index: centre, rotate, per-coordinate Lloyd-Max codes; scan packed codes with FAISS fast-scan.

Encoding a unit row x: y = x - mean (the Gemma table's mean has norm ~0.45: centring removes the
shared direction the codes would otherwise spend bits on), z = R y (the seeded TurboQuant rotation,
agp.quant.rotation), code_j = nearest level of codebook_j (agp.quant.lloyd_max.quantize). Codebook j is
one Lloyd-Max shape fitted to the standardised rotated coordinates, scaled by coordinate j's std,
so the codes match the data rather than the data-oblivious N(0, 1/d) codebook. A per-row fp16
scale a = <z, ẑ>/|ẑ|² (least-squares gain) corrects each row's reconstruction length.

Score estimate for a query q: <q, mean> + a * <R q, ẑ>. The packed rows are exactly FAISS's PQ code
layout for M = padded_dim/g sub-quantizers of g coordinates (g = 4 // bits for 1, 2, 4 bits), so the
scan runs in FAISS's 4-bit fast-scan (SIMD lookup tables) without decoding the base to floats; the
fast scan's 8-bit lookup tables are then corrected by re-scoring a short list exactly from the codes
(float tables and the scale). 3 and 8 bits use FAISS's plain PQ scan. Optional exact rerank uses
stored fp16/fp32 vectors.
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
from agp.index import loader, snapshot
from agp.quant import bitpack, lloyd_max
from agp.quant.rotation import Rotation

BITS = (2, 3, 4, 8)
STORES = ("none", "fp16", "fp32")
ENCODE_CHUNK = 16384


@dataclass
class IndexArgs(ConfigMixin):
    bits: int = 4            # bits per rotated coordinate (4 and 8; 2 and 3 as options)
    seed: int = 0            # rotation seed
    store: str = "none"      # keep vectors for exact rerank: none | fp16 | fp32
    fit_rows: int = 1024     # rows sampled to fit the codebook shape (x padded_dim coordinates each)
    centre: bool = True      # subtract the build set's mean before rotating


class TQIndex:
    """Inner-product top-k over TurboQuant-coded unit vectors."""

    def __init__(self, dim, bits, seed, mean, codebook, scale, codes, vectors=None, store="none", path=None):
        self.dim, self.bits, self.seed, self.store, self.path = int(dim), int(bits), int(seed), store, path
        self.rotation = Rotation(self.dim, self.seed)
        self.padded_dim = self.rotation.padded_dim
        self.mean, self.codebook, self.scale, self.codes, self.vectors = mean, codebook, scale, codes, vectors
        self.code_bytes = bitpack.packed_size(self.padded_dim, self.bits)
        self._bounds = lloyd_max.boundaries(codebook)  # [pd, 2**bits - 1]
        self._engine = None
        self._snapshot = None

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, src, args: IndexArgs | None = None) -> "TQIndex":
        """Fit mean and codebooks on `src` (array / .npy / .jsonl) and encode every row."""
        args = args or IndexArgs()
        if args.bits not in BITS:
            raise AGPError(f"index bits must be one of {BITS}, got {args.bits}")
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
                  vectors=None if args.store == "none" else np.zeros((0, dim), _store_dtype(args.store)))
        idx._add_unit(x)
        return idx

    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes, scales = [], []
        for i in range(0, len(x), ENCODE_CHUNK):
            z = self.rotation.apply(x[i:i + ENCODE_CHUNK] - self.mean)
            idx = np.zeros(z.shape, np.uint8)
            for t in range(self._bounds.shape[1]):  # count the boundaries below each coordinate
                idx += z > self._bounds[:, t]
            zh = self._levels(idx)
            scales.append((np.einsum("nd,nd->n", z, zh) / np.maximum(np.einsum("nd,nd->n", zh, zh), 1e-30)).astype(np.float16))
            codes.append(bitpack.pack(idx, self.bits))
        return np.concatenate(codes), np.concatenate(scales)

    def _levels(self, idx: np.ndarray) -> np.ndarray:
        return self.codebook[np.arange(self.padded_dim), idx.astype(np.intp)]

    def _add_unit(self, x: np.ndarray) -> None:
        codes, scales = self._encode(x)
        self.codes = np.concatenate([self.codes, codes]) if len(self.codes) else codes
        self.scale = np.concatenate([self.scale, scales]) if len(self.scale) else scales
        if self.store != "none":
            v = x.astype(_store_dtype(self.store))
            self.vectors = np.concatenate([self.vectors, v]) if len(self.vectors) else v
        self._engine = None

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
        """The FAISS index over the packed codes (built on first search; codes are passed as-is)."""
        if self._engine is not None:
            return self._engine
        g = self._group()
        m, nbits = self.padded_dim // g, self.bits * g
        pq = faiss.IndexPQ(self.padded_dim, m, nbits, faiss.METRIC_INNER_PRODUCT)
        faiss.copy_array_to_vector(self._sub_centroids(g).ravel(), pq.pq.centroids)
        pq.is_trained = True
        if len(self):
            faiss.copy_array_to_vector(np.ascontiguousarray(self.codes).ravel(), pq.codes)
        pq.ntotal = len(self)
        self._engine = faiss.IndexPQFastScan(pq) if nbits == 4 else pq
        return self._engine

    def _sub_centroids(self, g: int) -> np.ndarray:
        """[M, 2**(bits*g), g] centroids: the product of g per-coordinate codebooks (code = c0 + c1<<bits ...)."""
        k = 1 << self.bits
        cb = self.codebook.reshape(self.padded_dim // g, g, k)
        v = np.arange(k ** g)
        digits = (v[:, None] >> (self.bits * np.arange(g))[None, :]) & (k - 1)  # [k^g, g]
        return np.stack([cb[:, i, digits[:, i]] for i in range(g)], axis=-1).astype(np.float32)

    # -- search -------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, rescore: int | None = None, rerank: int = 0):
        """Top-k by inner product: returns (scores [nq, k] float32, ids [nq, k] int64; -1 pads).

        `rescore` short-list size re-scored from the codes with float tables and row scales
        (default max(4k, 64)); `rerank` > 0 re-scores that many candidates exactly with the stored
        vectors (needs store fp16/fp32).
        """
        q = loader.check_rows(queries, "query", self.dim)
        _check_search_sizes(k, rerank, rescore)
        if rerank and self.vectors is None:
            raise AGPError("rerank needs stored vectors; build the index with --store fp16 or fp32")
        n = len(self)
        # rerank takes the best `rerank` by the code estimate out of a 2x wider fast-scan list: the
        # fast scan's 8-bit tables would otherwise decide the rerank candidates on their own
        short = min(n, max(k, rescore if rescore is not None else max(4 * k, 64), 2 * rerank))
        nq = len(q)
        if n == 0:
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        zq = self.rotation.apply(q)
        cand = self._candidates(zq, short)
        valid = cand >= 0
        cand = np.where(valid, cand, 0)   # a placeholder row to index with; its score is -inf below
        scores = np.empty(cand.shape, np.float32)
        for i in range(0, nq, 32):  # bounded memory: [32, short, pd] codes at a time
            c = cand[i:i + 32]
            lv = self._levels(bitpack.unpack(self.codes[c.ravel()], self.bits, self.padded_dim)).reshape(*c.shape, -1)
            scores[i:i + 32] = np.einsum("qkd,qd->qk", lv, zq[i:i + 32]) * self.scale[c].astype(np.float32)
        scores += (q @ self.mean)[:, None]
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        cand, scores = np.take_along_axis(cand, order, 1), np.take_along_axis(scores, order, 1)
        if rerank:
            cand, scores = cand[:, :rerank], scores[:, :rerank]
            scores = np.where(np.isfinite(scores),
                              np.einsum("qkd,qd->qk", self.vectors[cand].astype(np.float32), q), -np.inf)
            order = np.argsort(-scores, axis=1, kind="stable")
            cand, scores = np.take_along_axis(cand, order, 1), np.take_along_axis(scores, order, 1)
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
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
        _, cand = self.engine().search(zq, short)
        return cand

    # -- snapshot -----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the `.tqidx` snapshot atomically."""
        arrays = {"mean": self.mean, "codebook": self.codebook, "scale": self.scale, "codes": self.codes}
        if self.vectors is not None:
            arrays["vectors"] = self.vectors
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
        except (KeyError, ValueError, TypeError) as e:
            raise AGPError(f"{path}: snapshot header is inconsistent ({e}); rebuild it") from None
        idx = cls(dim, bits, seed, a["mean"], a["codebook"], a["scale"], a["codes"], a.get("vectors"),
                  store=m["store"], path=str(path))
        idx._snapshot = snap
        return idx

    def info(self) -> dict:
        """Vectors, dimension, bits, bytes and the compression ratio versus fp32."""
        return {"vectors": len(self), "dim": self.dim, "padded_dim": self.padded_dim, "bits": self.bits,
                "seed": self.seed, "store": self.store, "bytes_per_vector": self.bytes_per_vector,
                "compression_vs_fp32": round(4 * self.dim / self.bytes_per_vector, 2)}


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
