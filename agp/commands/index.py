"""`agp index build|search|inspect|append`: the TurboQuant retrieval index from the shell."""
from __future__ import annotations

import json

import numpy as np

from agp import argtypes

MAX_K = 1 << 16   # results per query the CLI prints; more is a dump of the index, not a search


def add_parser(sub):
    p = sub.add_parser("index", help="build, search, inspect or append to a TurboQuant .tqidx index",
                       description="TurboQuant retrieval index over unit vectors (inner product = cosine). "
                                   "Snapshots are .tqidx files (docs/index.md).")
    isub = p.add_subparsers(dest="index_cmd", metavar="ACTION", required=True)
    b = isub.add_parser("build", help="build a snapshot from vectors (.npy or .jsonl)")
    b.add_argument("vectors", help=".npy [N, d] float array, or .jsonl rows (array, or object with "
                                  "embedding / vector / values / embedding_vector)")
    b.add_argument("out", help="snapshot path to write (.tqidx)")
    b.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="bits per rotated coordinate (default 4)")
    b.add_argument("--store", default="none", choices=["none", "fp16", "fp32"], help="keep vectors for exact rerank")
    b.add_argument("--seed", type=argtypes.seed(), default=0, help="rotation seed (0 .. 2**32-1)")
    b.add_argument("--force", action="store_true", help="replace an existing OUT that is not a .tqidx snapshot")
    b.set_defaults(func=_build)
    s = isub.add_parser("search", help="top-k for query vectors; prints one JSON line per query")
    s.add_argument("index", help=".tqidx snapshot")
    s.add_argument("queries", help=".npy or .jsonl query vectors")
    s.add_argument("-k", type=argtypes.int_range(1, MAX_K), default=10, help=f"results per query (1..{MAX_K})")
    s.add_argument("--rerank", type=argtypes.non_negative_int(), default=0,
                   help="re-score this many candidates exactly, 0 or >= k (needs --store at build)")
    s.set_defaults(func=_search)
    i = isub.add_parser("inspect", help="print vectors, dimension, bits and compression ratio vs fp32")
    i.add_argument("index", help=".tqidx snapshot")
    i.set_defaults(func=_inspect)
    a = isub.add_parser("append", help="encode more vectors into an existing snapshot (same codebooks)")
    a.add_argument("index", help=".tqidx snapshot to extend (rewritten atomically)")
    a.add_argument("vectors", help=".npy or .jsonl vectors of the index's dimension")
    a.set_defaults(func=_append)


def _build(args) -> int:
    from agp.index import IndexArgs, TQIndex
    from agp.index.tqindex import check_output

    out = check_output(args.out, [args.vectors], force=args.force)
    idx = TQIndex.build(args.vectors, IndexArgs(bits=args.bits, store=args.store, seed=args.seed))
    idx.save(out)
    print(json.dumps({"wrote": args.out, **idx.info()}))
    return 0


def _search(args) -> int:
    from agp.index import TQIndex
    from agp.index.loader import load_vectors

    idx = TQIndex.open(args.index)
    scores, ids = idx.search(load_vectors(args.queries, idx.dim), args.k, rerank=args.rerank)
    for s, i in zip(scores, ids):
        keep = i >= 0
        print(json.dumps({"ids": i[keep].tolist(), "scores": np.round(s[keep], 6).tolist()}))
    return 0


def _inspect(args) -> int:
    from agp.index import TQIndex

    idx = TQIndex.open(args.index)
    for k, v in {**idx.info(), "file": args.index}.items():
        print(f"{k:>20}: {v}")
    return 0


def _append(args) -> int:
    from agp.index.tqindex import append

    print(json.dumps({"index": args.index, "vectors": append(args.index, args.vectors)}))
    return 0
