"""Retrieval index vs FAISS and turbovec peers on real vectors (recall@10, bytes, build, latency, throughput).

Datasets: the real Gemma 3 270M token-embedding table (262144 x 640) with 1000 rows held out as queries,
and hidden states of the prompt pack (one layer, every position). Ground truth is exact fp32 inner
product over L2-normalised rows. Every method runs in the same process, one at a time, with the same
thread count, so ratios are fair.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from agp.config import ConfigMixin
from agp.errors import AGPError

K = 10


@dataclasses.dataclass
class BenchArgs(ConfigMixin):
    dataset: str = "embed"  # embed | hidden | both
    rows: int = 0  # use only this many base rows of the embedding table (0 = all 262144)
    queries: int = 1000  # held-out query rows
    single: int = 200  # queries timed one at a time (mean, p95)
    threads: int = 2
    layer: int = 12  # hidden-state layer for the `hidden` dataset
    prompts: int = 12  # prompts per source for the `hidden` dataset
    methods: str = "all"  # comma list of method names, or all
    seed: int = 0


# --- data ----------------------------------------------------------------------------------
def embed_split(rows: int = 0, queries: int = 1000, seed: int = 0):
    """(base, queries) of unit rows from the real embedding table, queries held out of the base."""
    from agp.backbone.embedded import embedding_table
    from agp.index.load import check_rows

    t = embedding_table()
    rng = np.random.default_rng(seed)
    n = len(t)
    keep = np.sort(rng.choice(n, rows + queries, replace=False)) if rows and rows + queries < n else np.arange(n)
    qpos = np.sort(rng.choice(len(keep), queries, replace=False))
    mask = np.ones(len(keep), bool)
    mask[qpos] = False
    x = check_rows(np.asarray(t[keep], np.float32), "embedding table")
    return x[mask], x[qpos]


def hidden_split(layer: int = 12, per_source: int = 12, queries: int = 200, seed: int = 0):
    """(base, queries) of unit hidden states at `layer` over the prompt pack (real model)."""
    from agp.backbone import load
    from agp.data.prompt_pack import PromptPackArgs, build_prompt_pack
    from agp.index.load import check_rows

    bb = load()
    hs = []
    for p in build_prompt_pack(PromptPackArgs(per_source=per_source)):
        _, got = bb.capture(bb.encode(p["text"]), [layer])
        hs.append(np.asarray(got[layer][0], np.float32)[1:])  # drop BOS: its state is an outlier shared by all
    x = check_rows(np.concatenate(hs), "prompt-pack hidden states")
    rng = np.random.default_rng(seed)
    qpos = rng.choice(len(x), min(queries, len(x) // 5), replace=False)
    mask = np.ones(len(x), bool)
    mask[qpos] = False
    return x[mask], x[qpos]


def ground_truth(base: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    """Exact top-k ids by inner product (blocked so memory stays bounded)."""
    out = []
    for i in range(0, len(q), 100):
        s = q[i:i + 100] @ base.T
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


def recall(ids: np.ndarray, gt: np.ndarray, k: int = K) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(ids, gt)]))


# --- methods: name -> (build(base) -> searcher(q, k) -> ids, bytes per vector) ---------------
def _faiss(factory: str, rotate: bool = False):
    def build(base):
        import faiss

        d = base.shape[1]
        ix = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if rotate:
            rr = faiss.RandomRotationMatrix(d, d)
            rr.init(123)
            ix = faiss.IndexPreTransform(rr, ix)
        rng = np.random.default_rng(0)
        ix.train(base[rng.choice(len(base), min(len(base), 50000), replace=False)])
        ix.add(base)
        code = ix.sa_code_size() if factory != "Flat" else 4 * d
        return (lambda q, k: ix.search(q, k)[1]), code
    return build


def _turbovec(bits: int, calibrate: bool):
    def build(base):
        import turbovec

        ix = turbovec.TurboQuantIndex(base.shape[1], bits)
        if calibrate:
            rng = np.random.default_rng(0)
            ix.calibrate(np.ascontiguousarray(base[rng.choice(len(base), min(len(base), 4096), replace=False)]))
        ix.add(base)
        ix.prepare()
        code = (base.shape[1] * bits + 7) // 8 + 4  # codes + one f32 norm per row (its .tv layout)
        return (lambda q, k: ix.search(q, k)[1]), code
    return build


def _agp(bits: int, rerank: int = 0):
    def build(base):
        from agp.index.tqindex import IndexArgs, TQIndex

        ix = TQIndex.build(base, IndexArgs(bits=bits, keep_vectors=bool(rerank)))
        ix.engine()
        code = ix.bytes_per_vector + (2 * base.shape[1] if rerank else 0)
        return (lambda q, k: ix.search(q, k, rerank=rerank)[0]), code
    return build


METHODS = {
    "exact fp32": _faiss("Flat"),
    "faiss SQ8": _faiss("SQ8"),
    "faiss SQ8 +rot": _faiss("SQ8", rotate=True),
    "faiss SQ4": _faiss("SQ4"),
    "faiss SQ4 +rot": _faiss("SQ4", rotate=True),
    "faiss PQ640x4 fast-scan": _faiss("PQ640x4fs"),
    "faiss RaBitQ4 fast-scan": _faiss("RaBitQfs4"),
    "turbovec 4b": _turbovec(4, False),
    "turbovec 4b calibrated": _turbovec(4, True),
    "turbovec 2b": _turbovec(2, False),
    "turbovec 2b calibrated": _turbovec(2, True),
    "agp tq 2b": _agp(2),
    "agp tq 4b": _agp(4),
    "agp tq 4b rerank@100": _agp(4, 100),
    "agp tq 8b": _agp(8),
    "agp tq 8b rerank@100": _agp(8, 100),
}
def bits_of(name: str) -> int | None:
    """Bits per coordinate a method spends (None for fp32 / 8-bit families)."""
    for tok, b in (("2b", 2), ("4b", 4), ("SQ4", 4), ("x4", 4), ("RaBitQ4", 4), ("8b", 8), ("SQ8", 8)):
        if tok in name:
            return b
    return None


def measure(name: str, base: np.ndarray, q: np.ndarray, gt: np.ndarray, single: int = 200) -> dict:
    """Build one method and time it: recall@10, bytes/vector, build s, single mean/p95 ms, batch qps."""
    t0 = time.perf_counter()
    search, code = METHODS[name](base)
    build_s = time.perf_counter() - t0
    search(q[:2], K)  # warm caches / lazy engines
    t0 = time.perf_counter()
    ids = search(q, K)
    batch_s = time.perf_counter() - t0
    lat = []
    for i in range(min(single, len(q))):
        a = time.perf_counter()
        search(q[i:i + 1], K)
        lat.append(time.perf_counter() - a)
    lat = np.array(lat) * 1e3
    return {"method": name, "bits": bits_of(name), "bytes_per_vector": float(code),
            "recall@10": recall(np.asarray(ids), gt), "build_s": build_s,
            "single_mean_ms": float(lat.mean()), "single_p95_ms": float(np.percentile(lat, 95)),
            "batch_qps": len(q) / batch_s}


def format_table(rows: list[dict], title: str) -> str:
    """Markdown table of `measure` results."""
    head = ("| method | bytes/vec | recall@10 | build s | single mean ms | single p95 ms | batch q/s |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(f"| {r['method']} | {r['bytes_per_vector']:.0f} | {r['recall@10']:.4f} | {r['build_s']:.1f} | "
                   f"{r['single_mean_ms']:.2f} | {r['single_p95_ms']:.2f} | {r['batch_qps']:.0f} |\n" for r in rows)
    return f"### {title}\n\n{head}{body}"


def run(args: BenchArgs, progress: bool = True) -> dict:
    """Run every selected method on every selected dataset; returns {dataset: rows}."""
    import faiss

    faiss.omp_set_num_threads(args.threads)
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise AGPError(f"unknown bench method(s) {unknown}; choose from: {', '.join(METHODS)}")
    sets = {"embed": ["embed"], "hidden": ["hidden"], "both": ["embed", "hidden"]}.get(args.dataset)
    if sets is None:
        raise AGPError(f"--dataset must be embed, hidden or both, got {args.dataset!r}")
    out = {}
    for ds in sets:
        if ds == "embed":
            base, q = embed_split(args.rows, args.queries, args.seed)
            title = f"Gemma 3 270M token embeddings: {len(base)} x {base.shape[1]} base, {len(q)} held-out queries"
        else:
            base, q = hidden_split(args.layer, args.prompts, seed=args.seed)
            title = f"prompt-pack hidden states, layer {args.layer}: {len(base)} x {base.shape[1]} base, {len(q)} queries"
        gt = ground_truth(base, q)
        rows = []
        it = names
        if progress:
            from tqdm import tqdm
            it = tqdm(names, desc=ds, unit="method")
        for name in it:
            rows.append(measure(name, base, q, gt, args.single))
        out[ds] = {"title": title, "rows": rows}
    return out


def add_arguments(p):
    for f in dataclasses.fields(BenchArgs):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help={"dataset": "embed (262144-row token table), hidden (prompt-pack states) or both",
                             "rows": "base rows of the table to use (0 = all)",
                             "methods": f"comma list or all; names: {', '.join(METHODS)}"}.get(f.name))
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    ba = BenchArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchArgs)})
    res = run(ba, progress=not args.no_progress)
    for ds in res.values():
        print(format_table(ds["rows"], ds["title"]))
    if args.json:
        from agp.io import write_json
        write_json(args.json, {"args": ba.to_dict(), "results": res})
    return 0
