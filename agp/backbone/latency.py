"""Latency of prefill and per-token decode through the segmented path, with memory peaks."""
from __future__ import annotations

import resource
import time

import mlx.core as mx
import numpy as np


def measure(bb, prompts: list[list[int]], decode_tokens: int = 16, warmup: int = 1, progress=None) -> dict:
    """Greedy-decode each prompt; time prefill (to first logits) and every decode step."""
    prefill, decode = [], []
    mx.reset_peak_memory()
    for i, ids in enumerate([prompts[0]] * warmup + list(prompts)):
        cache = bb.make_cache()
        t0 = time.perf_counter()
        logits = bb.forward(mx.array([ids]), cache)
        nxt = mx.argmax(logits[0, -1])
        mx.eval(nxt)
        t1 = time.perf_counter()
        steps = []
        for _ in range(decode_tokens):
            s0 = time.perf_counter()
            logits = bb.forward(nxt.reshape(1, 1), cache)
            nxt = mx.argmax(logits[0, -1])
            mx.eval(nxt)
            steps.append(time.perf_counter() - s0)
        if i >= warmup:
            prefill.append(t1 - t0)
            decode.extend(steps)
        if progress and i >= warmup:
            progress.update(1)
    pre, dec = np.asarray(prefill), np.asarray(decode)
    return {
        "prefill_s": {"p50": float(np.median(pre)), "p95": float(np.percentile(pre, 95)), "n": len(pre)},
        "decode_s": {"p50": float(np.median(dec)), "p95": float(np.percentile(dec, 95)), "n": len(dec)},
        "decode_tok_per_s": float(1.0 / np.median(dec)),
        "prefill_tok_per_s": float(sum(len(p) for p in prompts) / pre.sum()),
        "mlx_peak_memory_mb": mx.get_peak_memory() / 2**20,
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
