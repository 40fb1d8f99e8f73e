"""Evaluation of a (possibly adapted) backbone: held-out NLL and per-layer lens sufficiency.

One forward pass per sequence gives both: the final logits score the next-token NLL over the
scored span (the response for SFT rows, everything for control text), and the hidden states at
every layer, read through the logit lens at a few fixed positions, give KL(final || lens) and
top-1 agreement. Sequences are scored one at a time in a fixed order and summed in float64,
so the same weights always reproduce the same number.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from agp.backbone.lens import lens_stats, probe_positions


def encode_rows(bb, rows: list[dict], max_tokens: int) -> list[tuple[list[int], int]]:
    """(token ids cut to max_tokens, index of the first scored token) per row. SFT rows score
    their response (from "response_start"); rows without it score every token after BOS."""
    out = []
    for r in rows:
        # encode whole, then cut: the limit here is the training window, not the model's context
        ids = bb.encode(r["text"], max_tokens=1 << 30)[:max_tokens]
        start = len(bb.encode(r["text"][: r["response_start"]], max_tokens=1 << 30)) if r.get("response_start") else 1
        if start < len(ids):
            out.append((ids, start))
    return out


def evaluate(bb, seqs: list[tuple[list[int], int]], lens_positions: int = 0, desc: str = "eval",
             lens_rows: int | None = None) -> dict:
    """NLL (nats/token), perplexity and token count over `seqs`; with lens_positions > 0 also the
    per-layer mean KL(final || lens) and top-1 agreement at that many positions per sequence, on
    the first `lens_rows` sequences (all when None): the lens pass costs a head per layer."""
    total, count = 0.0, 0
    per_seq = []
    layers = list(range(1, bb.n_layers + 1))
    kl, agree = [], []
    for i, (ids, start) in enumerate(tqdm(seqs, desc=desc, unit="seq", leave=False)):
        tok = mx.array([ids])
        if lens_positions and (lens_rows is None or i < lens_rows):
            logits, hidden = bb.capture(tok, layers)
        else:
            logits, hidden = bb.forward(tok), None
        lp = logits[0, :-1].astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        tgt = mx.array(ids[1:])
        nll = -mx.take_along_axis(lp, tgt[:, None], axis=-1)[:, 0][start - 1:]
        s = float(np.asarray(nll, dtype=np.float64).sum())
        total += s
        count += len(ids) - start
        per_seq.append(s / (len(ids) - start))
        if hidden is not None:
            pos = mx.array(probe_positions(len(ids), lens_positions))
            st = lens_stats(bb, {l: h[:, pos] for l, h in hidden.items()}, logits[:, pos], layers)
            kl.append(st["kl"])
            agree.append(st["agree"])
    out = {"nll": total / max(count, 1), "tokens": count, "sequences": len(seqs), "per_seq_nll": per_seq}
    out["ppl"] = float(np.exp(out["nll"]))
    if kl:
        out["lens"] = {"layers": layers, "kl_mean": np.concatenate(kl, 1).mean(1).tolist(),
                       "top1_agree": np.concatenate(agree, 1).mean(1).tolist()}
    return out
