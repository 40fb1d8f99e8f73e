"""The retrieval baseline's scoring on the tiny model: teacher-forced NLL equals a direct computation."""
from __future__ import annotations

import agp  # noqa: F401  (binds the fast BLAS before mlx)
import mlx.core as mx
import numpy as np

from agp.backbone import load
from agp.bench.retrieval import embed, score_answer


def test_score_answer_matches_log_softmax(tiny_model_dir):
    bb = load(tiny_model_dir["gemma3_text"])
    ids = bb.encode("def f(x):\n    return x * 2\n")
    prefix, answer = ids[:6], ids[6:12]
    s = score_answer(bb, prefix, answer)
    logits = np.array(bb.forward(mx.array([ids[:12]]))[0].astype(mx.float32))
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    want = -sum(logp[5 + i, t] for i, t in enumerate(answer))
    assert abs(s.nll - want) < 1e-3 * max(1.0, abs(want))
    assert s.agree == sum(int(np.argmax(logits[5 + i]) == t) for i, t in enumerate(answer))
    assert (s.tokens, s.processed) == (6, 12)


def test_embed_drops_bos():
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert np.array_equal(embed(table, [0, 2, 4]), table[[2, 4]].mean(axis=0))
