"""Logit-lens probe statistics per layer and position, batched over layers.

For hidden states h_l the lens distribution is softmax(head(h_l)). Against the full-depth
teacher p = softmax(head(h_L)) we report, per position: KL(p || lens_l), top-1 agreement
(argmax lens_l == argmax p), and the lens's top-1 minus top-2 probability margin. The
vocabulary-wide head (embedded.VOCAB_SIZE rows on the default model) dominates the cost, so layers go through it in groups (one batched matmul
per group) and the teacher's log-softmax is computed once.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np


def probe_positions(n_tokens: int, k: int) -> list[int]:
    """k evenly spaced positions (always the last), skipping BOS: a fixed, unbiased subsample
    keeps the per-layer head passes affordable (each costs vocab x hidden MACs per position)."""
    first = 1 if n_tokens > 1 else 0
    if n_tokens - first <= k:
        return list(range(first, n_tokens))
    return sorted({int(round(x)) for x in np.linspace(first, n_tokens - 1, k)})


def lens_stats(bb, hidden: dict[int, mx.array], final_logits: mx.array, layers=None,
               group: int = 4, translators=None) -> dict[str, np.ndarray]:
    """Per-layer, per-position statistics for one sequence.

    hidden: {layer: [1, T, H]} from `bb.capture`; final_logits: [1, T, V].
    translators: optional {layer: callable(h) -> h'} applied before the head (tuned lens).
    Returns arrays shaped [len(layers), T]: kl, agree, margin, plus teacher_entropy [T]."""
    layers = sorted(hidden) if layers is None else list(layers)
    f = final_logits[0].astype(mx.float32)
    logp = f - mx.logsumexp(f, axis=-1, keepdims=True)
    p = mx.exp(logp)
    top1 = mx.argmax(f, axis=-1)
    ent = -(p * logp).sum(-1)
    kl, agree, margin = [], [], []
    for i in range(0, len(layers), group):
        chunk = layers[i:i + group]
        hs = []
        for layer in chunk:
            h = hidden[layer][0]
            if translators and layer in translators:
                h = translators[layer](h)
            hs.append(h)
        logits = bb.head(mx.stack(hs)).astype(mx.float32)            # [g, T, V]
        lq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        kl.append((p[None] * (logp[None] - lq)).sum(-1))
        agree.append(mx.argmax(logits, axis=-1) == top1[None])
        t2 = mx.topk(lq, 2, axis=-1)                                  # ascending within the top 2
        margin.append(mx.exp(t2[..., 1]) - mx.exp(t2[..., 0]))
        mx.eval(kl[-1], agree[-1], margin[-1])
    cat = lambda xs: np.concatenate([np.asarray(x) for x in xs], axis=0)  # noqa: E731
    return {"layers": np.asarray(layers), "kl": np.maximum(cat(kl), 0.0), "agree": cat(agree).astype(bool),
            "margin": cat(margin), "teacher_entropy": np.asarray(ent)}
