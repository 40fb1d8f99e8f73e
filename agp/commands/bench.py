"""`agp bench TARGET`: comparison tables. Each target is one module of agp/bench/."""
from __future__ import annotations

import importlib

from agp.errors import AGPError

# target -> module exposing `add_arguments(parser)` and `main(args) -> int`
TARGETS = {
    "ane": "agp.bench.ane",
    "baseline": "agp.bench.baseline",
    "codecs": "agp.bench.codecs",
    "index": "agp.bench.index",
    "oracle": "agp.bench.oracle",
    "ptp-fuzz": "agp.bench.ptp_fuzz",
    "retrieval": "agp.bench.retrieval",
    "runtime": "agp.bench.runtime",
    "serve": "agp.bench.serve",
}


def add_parser(sub):
    p = sub.add_parser("bench", help="print benchmark comparison tables (codecs, index, baseline, ...)",
                       description="Benchmark comparison tables, measured in one run so ratios are fair.")
    tsub = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, modname in TARGETS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and modname.startswith(e.name):  # target not built yet
                continue
            raise
        tp = tsub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(tp)
        tp.set_defaults(func=mod.main)
    p.set_defaults(func=lambda a: (_ for _ in ()).throw(AGPError("choose a bench target")))
