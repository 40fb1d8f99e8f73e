"""Retrieval-only augmentation baseline: the same model plus retrieved passages, without AGP routing.

Corpus: the run's training-split lane rows (sft, routing, semantic), each cut to `--passage-tokens`
tokens. Embedding: the mean of the passages' token-embedding rows (the model's own embedding table).
That costs no forward pass, so retrieval adds no model MACs beyond the prepended tokens; mean-pooled
hidden states would cost a full forward per passage at build time and per prompt at query time,
i.e. the very compute the baseline is compared on. Index: `agp.index` (4-bit TurboQuant, exact
rerank from the fp32 store).

Held-out prompts (the held-out routing lane, as `agp bench runtime` uses) are split into a context of
`--context` tokens and an answer of `--answer` tokens. Both modes score the answer teacher-forced at
full depth: NLL per answer token, token agreement (argmax == the held-out token) and tokens processed
per answer (every token of the sequence runs through all layers). With retrieval the top
`--top` passages are prepended to the context.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agp.errors import AGPError


def add_arguments(p) -> None:
    p.description = __doc__
    p.add_argument("--run", default=None, help="finished run whose adapter stage wrote the lanes (default runs/latest)")
    p.add_argument("--passages", type=int, default=400, help="corpus passages indexed (training-split rows; default 400)")
    p.add_argument("--passage-tokens", type=int, default=48, help="tokens kept per passage (default 48)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts scored (default 8)")
    p.add_argument("--context", type=int, default=32, help="context tokens per prompt (default 32)")
    p.add_argument("--answer", type=int, default=32, help="answer tokens scored per prompt (default 32)")
    p.add_argument("--top", type=int, default=2, help="passages prepended per prompt (default 2)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


@dataclass
class Score:
    nll: float          # summed NLL of the answer tokens
    agree: int          # answer tokens whose argmax is the held-out token
    tokens: int         # answer tokens scored
    processed: int      # tokens run at full depth


def score_answer(bb, prefix: list[int], answer: list[int]) -> Score:
    """Teacher-forced NLL and argmax agreement of `answer` after `prefix` (one full-depth forward)."""
    import mlx.core as mx

    ids = prefix + answer
    logits = bb.forward(mx.array([ids]))[0, len(prefix) - 1:len(ids) - 1].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    target = mx.array(answer)
    nll = -mx.take_along_axis(logp, target[:, None], axis=-1).sum()
    agree = (mx.argmax(logits, axis=-1) == target).sum()
    return Score(float(nll.item()), int(agree.item()), len(answer), len(ids))


def embed(table: np.ndarray, ids: list[int]) -> np.ndarray:
    """Mean token-embedding row of `ids` (BOS dropped: it is the same in every text)."""
    return np.asarray(table[np.array(ids[1:] or ids)], dtype=np.float32).mean(axis=0)


def corpus(bb, rows: dict, n: int, tokens: int) -> list[list[int]]:
    """Up to `n` training-split passages (token ids without BOS), one per lane row, shortest dropped."""
    out = []
    for r in rows["train"]:
        ids = bb.encode(r["text"], max_tokens=tokens + 1, truncate=True)[1:]
        if len(ids) >= tokens // 2:
            out.append(ids)
        if len(out) >= n:
            break
    return out


def held_out(bb, rows: dict, n: int, context: int, answer: int) -> list[tuple[list[int], list[int]]]:
    held = [r for r in rows["heldout"] if r["lane"] == "routing"] or rows["heldout"]
    out = []
    for r in held:
        ids = bb.encode(r["text"], max_tokens=context + answer, truncate=True)
        if len(ids) == context + answer:
            out.append((ids[:context], ids[context:]))
        if len(out) >= n:
            break
    return out


def summarise(name: str, scores: list[Score], retrieved: int = 0) -> dict:
    tok = sum(s.tokens for s in scores)
    return {"mode": name, "prompts": len(scores), "nll_per_token": round(sum(s.nll for s in scores) / tok, 4),
            "token_agreement": round(sum(s.agree for s in scores) / tok, 4),
            "tokens_processed_per_answer": round(sum(s.processed for s in scores) / len(scores), 1),
            "retrieved_tokens_per_answer": retrieved}


def main(args) -> int:
    import json

    from agp import runs
    from agp.backbone import load
    from agp.backbone.embedded import embedding_table
    from agp.index import IndexArgs, TQIndex
    from agp.runtime.heads import backbone_source
    from agp.train.runtime import source_rows

    for name in ("passages", "passage_tokens", "prompts", "context", "answer", "top"):
        if getattr(args, name) < 1:
            raise AGPError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    run = runs.Run(args.run) if args.run else runs.latest_run()
    meta = backbone_source(run) if run.stage("runtime").get("status") == "done" else {}
    bb = load(meta.get("model"), adapter=meta.get("adapter_dir"))   # the backbone the routed runtime runs
    rows = source_rows(run)
    passages = corpus(bb, rows, args.passages, args.passage_tokens)
    prompts = held_out(bb, rows, args.prompts, args.context, args.answer)
    if len(passages) < args.top or not prompts:
        raise AGPError(f"the run's lanes give {len(passages)} passages and {len(prompts)} held-out prompts of "
                       f"{args.context + args.answer} tokens; lower --context/--answer or use a run with lanes")
    table = embedding_table()
    index = TQIndex.build(np.stack([embed(table, p) for p in passages]), IndexArgs(bits=4, store="fp32"))
    top = min(len(passages), max(args.top, 10))
    hits = index.search(np.stack([embed(table, c) for c, _ in prompts]), top, rerank=top)[1][:, :args.top]
    plain, aug, extra = [], [], 0
    for (ctx, ans), ids in zip(prompts, hits):
        plain.append(score_answer(bb, ctx, ans))
        got = [t for i in ids if i >= 0 for t in passages[i]]
        extra += len(got)
        aug.append(score_answer(bb, ctx[:1] + got + ctx[1:], ans))   # BOS, passages, then the context
    out = [summarise("model alone", plain), summarise(f"+ retrieval top-{args.top}", aug, round(extra / len(prompts), 1))]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    cols = list(out[0])
    print(f"{len(passages)} passages of <= {args.passage_tokens} tokens, {len(prompts)} held-out prompts "
          f"({args.context} context + {args.answer} answer tokens), full depth, teacher-forced\n")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in out:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0
