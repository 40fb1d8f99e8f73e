"""The four lanes: how a filtered record becomes rows of `sft`, `routing`, `semantic`, `transfer`.

Every row has "id" (content hash of "text"), "text" (exactly what the model reads), "split"
(train/valid/heldout by content hash, agp.data.splits) and "source" (the reader's format),
plus lane-specific fields documented in docs/data.md.
"""
from __future__ import annotations

import re

from agp.data.splits import content_id, split_of

LANES = ("sft", "routing", "semantic", "transfer")

# The SFT text the adapter trains on; the loss covers the response (from "response_start").
SFT_PROMPT = "### User\n{prompt}\n### Assistant\n"

# Concept lexicon for the semantic lane (DESIGN.md primitives plus invariants).
CONCEPTS = {
    "invariant": r"\binvariants?\b|\balways (?:holds?|true)\b|\bmust (?:always|never)\b|\bguarantee|\bidempot|"
                 r"\bprecondition|\bpostcondition|\bassert",
    "transition": r"\btransition|\bmigrat|\bstate machine|\bswitch(?:ing|es)? (?:to|from|over)|\bupgrad",
    "return": r"\breturn(?:s|ing)? to\b|\brevert|\broll ?back|\brestor|\bgo(?:es|ing)? back\b|\bundo",
    "dwell": r"\bdwell|\bstay(?:s|ing)? (?:in|at|on)\b|\bremain|\bpersist|\blinger|\bwait(?:s|ing)? (?:for|until)\b",
    "stabilize": r"\bstabili[sz]|\bstable\b|\bsteady|\bconverg|\bsettle|\bflak|\bequilibri",
    "echo": r"\becho|\brepeat(?:s|ed|ing)?\b|\bmirror",
    "shift": r"\bshift|\bpivot|\bdrift|\brefactor|\bchange (?:of|in) direction",
}
_CONCEPT_RE = {k: re.compile(v, re.I) for k, v in CONCEPTS.items()}

# Fields of a transfer-lane row (filled by stage 5 from instrumented forward passes).
TRANSFER_SCHEMA = {
    "id": "content hash of text", "text": "the prompt the forward pass read", "split": "train|valid|heldout",
    "source": "lane the prompt came from", "position": "token index of the state",
    "layer": "split layer the hidden state was taken after", "hidden_path": "NPZ file holding the state",
    "hidden_key": "array name inside hidden_path", "teacher_topk": "final-layer top-k token ids and logits",
    "model_fingerprint": "backbone fingerprint the state belongs to",
}


def split_key(rec: dict) -> str:
    """What decides a record's split: its prompt and response, so an exchange lands in the same
    split in every lane (a held-out pair is never trained on through another lane)."""
    return (rec.get("prompt") or "") + "\n\x00\n" + (rec.get("response") or "")


def _row(text: str, rec: dict, **fields) -> dict:
    return {"id": content_id(text), "text": text, "split": split_of(split_key(rec)), "source": rec["format"],
            "origin": rec["origin"], **fields}


def sft_row(rec: dict) -> dict | None:
    """A prompt -> response pair; prompt-only or response-less records are not SFT material."""
    p, r = (rec.get("prompt") or "").strip(), (rec.get("response") or "").strip()
    if not p or not r:
        return None
    head = SFT_PROMPT.format(prompt=p)
    return _row(head + r, rec, prompt=p, response=r, response_start=len(head))


def render_turns(turns: list[dict]) -> str:
    """Routing text: every turn on its own, tool actions and results marked."""
    lines = []
    for t in turns:
        if t["kind"] == "text":
            lines.append(f"[{t['role']}] {t['text'].strip()}")
        elif t["kind"] == "thinking":
            lines.append(f"[{t['role']} thinking] {t['text'].strip()}")
        elif t["kind"] == "tool_use":
            lines.append(f"[tool_use {t.get('tool', '?')}] {t['text'].strip()}")
        else:
            lines.append(f"[tool_result{' error' if t.get('is_error') else ''}] {t['text'].strip()}")
    return "\n".join(x for x in lines if x.strip())


def routing_row(rec: dict) -> dict | None:
    """The exchange with its process detail (tool actions, edits, thinking, multi-turn order)."""
    text = render_turns(rec.get("turns", []))
    if not text.strip():
        return None
    kinds = [t["kind"] for t in rec["turns"]]
    return _row(text, rec, n_turns=len(kinds),
                n_tool_actions=kinds.count("tool_use"), has_response=bool((rec.get("response") or "").strip()),
                tools=sorted({t.get("tool", "?") for t in rec["turns"] if t["kind"] == "tool_use"}),
                meta=rec.get("meta", {}))


def concepts_of(text: str) -> list[str]:
    """Semantic primitives/invariants a text expresses, by the lexicon in CONCEPTS."""
    return [k for k, pat in _CONCEPT_RE.items() if pat.search(text)]


def semantic_rows(rec: dict, oversample: int) -> list[dict]:
    """Every prompt once; prompts expressing a concept `oversample` times (ids id.0, id.1, ...)."""
    p = (rec.get("prompt") or "").strip()
    if not p:
        return []
    found = concepts_of(p)
    base = _row(p, rec, concepts=found)
    if not found:
        return [base]
    return [{**base, "id": f"{base['id']}.{k}", "replica": k} for k in range(max(1, oversample))]
