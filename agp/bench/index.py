"""Retrieval index vs FAISS and turbovec on real vectors (recall@10, bytes, build, latency, throughput).

Data: the real Gemma 3 270M token-embedding table (embedded.VOCAB_SIZE x 640), rows L2-normalised, `--queries`
rows held out at random as queries; or hidden states of the prompt pack (`--data hidden`). Ground
truth is the exact fp32 inner-product top-k. Every method runs in the same process on the same
threads, so ratios are fair.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np
from tqdm import tqdm

from agp import argtypes
from agp.bench.timer import timed
from agp.config import ConfigMixin
from agp.errors import AGPError

K = 10


@dataclass
class BenchArgs(ConfigMixin):
    data: str = "table"          # table | hidden
    rows: int = 0                # use this many base rows (0: all)
    queries: int = 1000          # held-out query rows
    single: int = 200            # queries timed one at a time
    threads: int = 2
    seed: int = 0
    methods: list = field(default_factory=list)  # subset of METHODS names (empty: all)
    out: str = ""                # directory for table.md / results.json / plot


def table_data(rows: int, queries: int, seed: int):
    """(base, queries) unit rows from the embedding table; queries are held out (not in base)."""
    from agp.backbone.embedded import embedding_table
    from agp.index.loader import check_rows

    x = embedding_table()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    base_ids = np.sort(perm[queries:queries + rows] if rows else perm[queries:])
    return check_rows(x[base_ids], "embedding table"), check_rows(x[np.sort(perm[:queries])], "embedding table")


def hidden_data(rows: int, queries: int, seed: int, layer: int = 12):
    """(base, queries) from the prompt pack's hidden states at `layer` (every position of every prompt)."""
    import mlx.core as mx

    from agp.backbone import load
    from agp.data.prompt_pack import PromptPackArgs, build_prompt_pack
    from agp.index.loader import check_rows

    bb = load()
    hs = []
    for p in tqdm(build_prompt_pack(PromptPackArgs(per_source=60, max_chars=2000)), desc="hidden states", leave=False):
        _, h = bb.capture(mx.array([bb.encode(p["text"])]), [layer])
        hs.append(np.array(h[layer][0].astype(mx.float32))[1:])  # drop BOS: identical across prompts
    x = np.concatenate(hs)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    base = perm[queries:queries + rows] if rows else perm[queries:]
    return check_rows(x[base], "hidden states"), check_rows(x[perm[:queries]], "hidden states")


# -- methods: name -> (bits, builder(base, seed) -> (search(q, k) -> ids, bytes_per_vector)) -----

def _faiss(index, base):
    index.train(base[: min(len(base), 65536)])
    index.add(base)
    return (lambda q, k: index.search(q, k)[1]), index.sa_code_size() if hasattr(index, "sa_code_size") else None


def _flat(base, seed):
    idx = faiss.IndexFlatIP(base.shape[1])
    idx.add(base)
    return (lambda q, k: idx.search(q, k)[1]), 4 * base.shape[1]


def _sq(qtype, rotate):
    def build(base, seed):
        d = base.shape[1]
        sq = faiss.IndexScalarQuantizer(d, qtype, faiss.METRIC_INNER_PRODUCT)
        idx = faiss.IndexPreTransform(faiss.RandomRotationMatrix(d, d), sq) if rotate else sq
        if rotate:
            idx.prepend_transform  # noqa: B018  (keeps the reference alive with the index)
        idx.train(base[: min(len(base), 65536)])
        idx.add(base)
        return (lambda q, k: idx.search(q, k)[1]), sq.sa_code_size()
    return build


def _pq_fastscan(base, seed):
    d = base.shape[1]
    idx = faiss.IndexPQFastScan(d, d, 4, faiss.METRIC_INNER_PRODUCT)  # 4 bits per coordinate: equal bytes
    idx.pq.cp.niter = 10  # 640 one-dimensional k-means: 10 rounds converge, the default 25 takes minutes here
    idx.train(base[np.random.default_rng(seed).choice(len(base), min(len(base), 4096), replace=False)])
    idx.add(base)
    return (lambda q, k: idx.search(q, k)[1]), d // 2


def _rabitq(base, seed):
    if not hasattr(faiss, "IndexRaBitQFastScan"):
        raise AGPError("this faiss has no RaBitQ")
    d = base.shape[1]
    idx = faiss.IndexRaBitQFastScan(d, faiss.METRIC_INNER_PRODUCT)
    idx.train(base[: min(len(base), 65536)])
    idx.add(base)
    return (lambda q, k: idx.search(q, k)[1]), idx.sa_code_size()


def _turbovec(bits, calibrate):
    def build(base, seed):
        import turbovec

        idx = turbovec.TurboQuantIndex(dim=base.shape[1], bit_width=bits)
        if calibrate:  # a uniform random sample, as turbovec's docs require
            idx.calibrate(base[np.random.default_rng(seed).choice(len(base), min(len(base), 2048), replace=False)])
        idx.add(base)
        idx.prepare()
        return (lambda q, k: idx.search(q, k)[1]), len(idx.to_bytes()) / len(base)
    return build


def _agp(bits, rerank, scan="fast"):
    def build(base, seed):
        from agp.index.tqindex import IndexArgs, TQIndex

        # fp32 rerank store: fp16 rounding flips near-ties (full table, rerank 100: 0.9795 fp16 vs 0.9808 fp32)
        idx = TQIndex.build(base, IndexArgs(bits=bits, seed=seed, store="fp32" if rerank else "none", scan=scan))
        return (lambda q, k: idx.search(q, k, rerank=rerank)[1]), idx.bytes_per_vector
    return build


METHODS = {
    "exact fp32": (32, _flat),
    "faiss SQ8": (8, _sq(faiss.ScalarQuantizer.QT_8bit, False)),
    "faiss SQ8 +rot": (8, _sq(faiss.ScalarQuantizer.QT_8bit, True)),
    "faiss SQ4": (4, _sq(faiss.ScalarQuantizer.QT_4bit, False)),
    "faiss SQ4 +rot": (4, _sq(faiss.ScalarQuantizer.QT_4bit, True)),
    "faiss PQ4 fast-scan": (4, _pq_fastscan),
    "faiss RaBitQ fast-scan": (1, _rabitq),
    "turbovec 4b": (4, _turbovec(4, False)),
    "turbovec 4b calib": (4, _turbovec(4, True)),
    "turbovec 2b": (2, _turbovec(2, False)),
    "turbovec 2b calib": (2, _turbovec(2, True)),
    "agp 4b v1": (4, _agp(4, 0, "v1")),
    "agp 4b": (4, _agp(4, 0)),
    "agp 4b rerank100": (4, _agp(4, 100)),
    "agp 8b v1": (8, _agp(8, 0, "v1")),
    "agp 8b": (8, _agp(8, 0)),
    "agp 8b rerank100": (8, _agp(8, 100)),
    "agp 2b": (2, _agp(2, 0)),
}


def recall(ids: np.ndarray, gt: np.ndarray, k: int = K) -> float:
    """Mean fraction of the exact top-k found in the returned top-k."""
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(ids, gt)]))


def measure(name, base, queries, gt, args: BenchArgs) -> dict:
    """Build one method, then time batch search and `args.single` one-query searches."""
    bits, builder = METHODS[name]
    build_s, (search, bpv) = timed(builder, base, args.seed)
    search(queries[:1], K)  # warm caches
    batch_s, ids = timed(search, queries, K)
    lat = np.array([timed(search, queries[i:i + 1], K)[0] for i in range(min(args.single, len(queries)))]) * 1e3
    return {"method": name, "bits": bits, "bytes_per_vector": round(float(bpv), 1), "recall@10": round(recall(ids, gt), 4),
            "build_s": round(build_s, 2), "build_rows_s": round(len(base) / build_s),
            "single_mean_ms": round(float(lat.mean()), 3),
            "single_p95_ms": round(float(np.percentile(lat, 95)), 3), "batch_qps": round(len(queries) / batch_s, 1)}


def run(args: BenchArgs) -> list[dict]:
    """Every selected method on one data set; returns one result row per method."""
    faiss.omp_set_num_threads(args.threads)
    base, queries = (table_data if args.data == "table" else hidden_data)(args.rows, args.queries, args.seed)
    gt = faiss.IndexFlatIP(base.shape[1])
    gt.add(base)
    gt = gt.search(queries, K)[1]
    names = args.methods or list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise AGPError(f"unknown bench methods {unknown}; choose from {list(METHODS)}")
    rows = []
    for name in tqdm(names, desc=f"index bench ({len(base)} x {base.shape[1]})"):
        try:
            rows.append(measure(name, base, queries, gt, args))
        except AGPError as e:  # a peer missing from this install: say so in the table
            rows.append({"method": name, "bits": METHODS[name][0], "note": str(e)})
    for r in rows:
        r.update(data=args.data, base_rows=len(base), dim=base.shape[1], queries=len(queries))
    return rows


COLS = ["method", "bits", "bytes_per_vector", "recall@10", "build_s", "build_rows_s", "single_mean_ms", "single_p95_ms", "batch_qps"]


def format_table(rows: list[dict]) -> str:
    """Markdown table of the result rows."""
    out = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, r.get("note", "-") if c == "recall@10" else "-")) for c in COLS) + " |")
    return "\n".join(out)


def add_arguments(p) -> None:
    p.description = __doc__
    p.add_argument("--data", choices=["table", "hidden"], default="table", help="real vectors: embedding table or prompt-pack hidden states")
    p.add_argument("--rows", type=argtypes.non_negative_int(), default=0, help="base rows (0 = all; the table has 262144 minus the queries)")
    p.add_argument("--queries", type=argtypes.positive_int(), default=1000, help="held-out query rows")
    p.add_argument("--single", type=argtypes.non_negative_int(), default=200, help="queries timed one at a time for mean/p95 latency")
    p.add_argument("--threads", type=argtypes.positive_int(), default=2, help="FAISS OpenMP threads")
    p.add_argument("--methods", nargs="*", default=[], help=f"subset of: {', '.join(METHODS)}")
    p.add_argument("--out", default="", help="directory to write table.md, results.json and recall_latency.png")


def main(args) -> int:
    """`agp bench index`: print the comparison table (and write it with --out)."""
    ba = BenchArgs(data=args.data, rows=args.rows, queries=args.queries, single=args.single, threads=args.threads,
                   methods=args.methods, out=args.out)
    rows = run(ba)
    text = format_table(rows)
    print(f"\nindex bench: {rows[0]['data']} {rows[0]['base_rows']} x {rows[0]['dim']}, {rows[0]['queries']} queries, "
          f"{ba.threads} threads, recall@{K}\n")
    print(text)
    if ba.out:
        from pathlib import Path

        from agp.io import write_json, write_text
        from agp.report.plots import save

        out = Path(ba.out)
        write_text(out / "table.md", text + "\n")
        write_json(out / "results.json", rows)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            if "recall@10" in r and isinstance(r["recall@10"], float):
                ax.scatter(r["single_p95_ms"], r["recall@10"], s=20 + r["bytes_per_vector"] / 10)
                ax.annotate(r["method"], (r["single_p95_ms"], r["recall@10"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("single-query p95 latency (ms, log)")
        ax.set_ylabel("recall@10")
        ax.set_title("retrieval index: recall vs latency (marker size ~ bytes/vector)")
        save(fig, out / "recall_latency.png")
    return 0
