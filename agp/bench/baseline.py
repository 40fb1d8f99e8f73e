"""Backbone speed: mlx-lm forward vs AGP's segmented forward and capture, prefill and decode.

All rows are measured in one process, so the ratios (segmented / mlx-lm) are what to compare
across machines; absolute times depend on the BLAS in use (printed).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from agp import argtypes
from agp.bench.timer import samples, timed


def add_arguments(p):
    p.add_argument("--model", default=None, help="mlx-lm directory or hub id (default: embedded Gemma 3 270M)")
    p.add_argument("--tokens", type=argtypes.positive_int(), default=128, help="prompt length for prefill rows (default 128)")
    p.add_argument("--decode", type=argtypes.positive_int(), default=32, help="decode steps timed per row (default 32)")
    p.add_argument("--reps", type=argtypes.positive_int(), default=5, help="repetitions per prefill row (default 5)")


def _decode_times(bb, ids, steps: int, segmented: bool) -> np.ndarray:
    cache = bb.make_cache()

    def step(token):
        logits = bb.forward(token, cache) if segmented else bb.model(token, cache=cache)
        token = mx.argmax(logits[0, -1]).reshape(1, 1)
        mx.eval(token)
        return token

    token = mx.argmax(bb.model(mx.array([ids]), cache=cache)[0, -1]).reshape(1, 1)
    seconds = []
    for _ in range(steps):
        dt, token = timed(step, token)
        seconds.append(dt)
    return np.asarray(seconds)


def measure(bb, tokens: int = 128, decode: int = 32, reps: int = 5) -> list[dict]:
    """Rows of {name, p50_s, p95_s, tok_per_s, ratio_vs_mlx_lm}."""
    from agp.data.prompt_pack import build_prompt_pack

    text = " ".join(r["text"] for r in build_prompt_pack())
    ids = bb.encode(text, max_tokens=tokens, truncate=True)
    tok = mx.array([ids])
    every = list(range(1, bb.n_layers + 1))
    rows = []
    jobs = [("prefill mlx-lm", lambda: mx.eval(bb.model(tok)), len(ids)),
            ("prefill segmented", lambda: mx.eval(bb.forward(tok)), len(ids)),
            ("prefill capture all layers", lambda: mx.eval(bb.capture(tok, every)), len(ids))]
    for name, fn, n in tqdm(jobs, desc="prefill", unit="row"):
        t = samples(fn, reps, warmup=1)  # warm-up: graph build, allocation
        rows.append({"name": name, "p50_s": float(np.median(t)), "p95_s": float(np.percentile(t, 95)),
                     "tok_per_s": n / float(np.median(t))})
    for name, seg in tqdm([("decode mlx-lm", False), ("decode segmented", True)], desc="decode", unit="row"):
        t = _decode_times(bb, ids, decode, seg)
        rows.append({"name": name, "p50_s": float(np.median(t)), "p95_s": float(np.percentile(t, 95)),
                     "tok_per_s": 1 / float(np.median(t))})
    ref = {"prefill": rows[0]["p50_s"], "decode": rows[3]["p50_s"]}
    for r in rows:
        r["ratio_vs_mlx_lm"] = r["p50_s"] / ref[r["name"].split()[0]]
    return rows


def main(args) -> int:
    from agp import BLAS
    from agp.backbone import load

    bb = load(args.model)
    rows = measure(bb, args.tokens, args.decode, args.reps)
    print(f"backbone {bb.arch} ({bb.n_layers} layers) | BLAS {BLAS['blas']} | prompt {args.tokens} tokens")
    print(f"{'row':<28}{'p50 ms':>10}{'p95 ms':>10}{'tok/s':>10}{'vs mlx-lm':>11}")
    for r in rows:
        print(f"{r['name']:<28}{r['p50_s']*1e3:>10.1f}{r['p95_s']*1e3:>10.1f}{r['tok_per_s']:>10.1f}"
              f"{r['ratio_vs_mlx_lm']:>10.2f}x")
    return 0
