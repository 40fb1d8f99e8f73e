"""`agp model`: convert, verify and describe backbones."""
from __future__ import annotations

import json

from agp.errors import AGPError


def add_parser(sub):
    p = sub.add_parser("model", help="convert / verify / describe the backbone",
                       description="The embedded default (Gemma 3 270M from the PyPI GGUF package) is converted "
                                   "once into $AGP_CACHE (default ~/.cache/agp) as an mlx-lm directory. "
                                   "`convert` (re)builds it, `verify` re-hashes every cached file, `info` prints "
                                   "architecture, sizes, fingerprints and MACs per token.")
    msub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = msub.add_parser("convert", help="build the embedded model cache (--force rebuilds it)")
    c.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    c.set_defaults(func=convert)
    v = msub.add_parser("verify", help="re-hash the cached embedded model against its marker")
    v.set_defaults(func=verify)
    i = msub.add_parser("info", help="architecture, parameter count, fingerprints, MACs per token")
    i.add_argument("--model", default=None, help="mlx-lm directory or hub id (default: embedded)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=info)
    p.set_defaults(func=lambda a: (_ for _ in ()).throw(AGPError("choose an action: convert, verify, info")))


def convert(args) -> int:
    from agp.backbone import embedded
    target = embedded.target_dir()
    if args.force or not embedded.is_complete(target):
        embedded.convert(target)
    print(f"agp: embedded model ready at {target}")
    return 0


def verify(args) -> int:
    from agp.backbone import embedded
    target = embedded.target_dir()
    if not target.exists():
        raise AGPError(f"no cached model at {target}; run `agp model convert`")
    problem = embedded.damage(target, full=True)
    if problem:
        raise AGPError(f"cached model at {target} is corrupt or partial ({problem}); run `agp model convert --force`")
    print(f"agp: {target} verified (every file matches its sha256)")
    return 0


def info(args) -> int:
    from mlx.utils import tree_flatten

    from agp.backbone import load, macs
    bb = load(args.model)
    n_params = sum(v.size for _, v in tree_flatten(bb.model.parameters()))
    cost = macs.summary(bb)
    rec = {"path": str(bb.path), "arch": bb.arch, "layers": bb.n_layers, "hidden": bb.hidden_size,
           "vocab": bb.vocab_size, "parameters": int(n_params), "fingerprint": bb.fingerprint,
           "tokenizer_fingerprint": bb.tokenizer_fingerprint, "macs_per_token": cost["total"],
           "head_share_of_macs": round(cost["head_share"], 4)}
    if args.json:
        print(json.dumps(rec, indent=2))
    else:
        for k, v in rec.items():
            print(f"{k:>22}: {v}")
    return 0
