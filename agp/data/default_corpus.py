"""The offline default corpus, used when the user brings no transcripts.

Three real local sources that exist on every machine with Python:
  code   top-level functions/classes of the standard library's pure-Python modules, each as a
         pair "show me `name` from module `m`" -> its source (cut at a line end)
  docs   `pydoc_data.topics` (the language reference), each topic cut into chunks, as a pair
         "explain topic T" -> the chunk
  chat   conversational and planning prompt/response pairs kept in fixtures/corpus/chat_pairs.jsonl
Selection is deterministic (sorted files, seeded shuffles), so one interpreter version always
yields the same corpus. Records have the same shape as `agp.data.sources` readers produce.
"""
from __future__ import annotations

import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from agp.config import ConfigMixin
from agp.data.jsonl import ReadStats
from agp.data.prompt_pack import _cut
from agp.data.sources import read_pairs

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "corpus"
CHAT_PAIRS = FIXTURES / "chat_pairs.jsonl"
CONTROL = FIXTURES / "control.jsonl"
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "__pycache__"}


@dataclass
class CorpusArgs(ConfigMixin):
    code: int = 240          # code pairs (at most one block per stdlib file)
    docs: int = 160          # documentation chunks
    max_chars: int = 600     # response length cap (cut at a line end)
    min_chars: int = 120
    seed: int = 0


def _pair(fmt: str, origin: str, prompt: str, response: str, **meta) -> dict:
    return {"format": fmt, "origin": origin, "prompt": prompt, "response": response, "meta": meta,
            "turns": [{"role": "user", "kind": "text", "text": prompt},
                      {"role": "assistant", "kind": "text", "text": response}]}


def code_records(args: CorpusArgs) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(
        p for p in root.glob("*/*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts)))
    rng = random.Random(args.seed)
    rng.shuffle(files)
    out = []
    for f in files:
        if len(out) >= args.code:
            break
        try:
            src = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        blocks = [b for b in re.split(r"\n(?=(?:def|class) )", src)[1:] if len(b) >= args.min_chars]
        if not blocks:
            continue
        block = rng.choice(blocks)
        m = re.match(r"(def|class) (\w+)", block)
        module = ".".join(f.relative_to(root).with_suffix("").parts)
        kind = "function" if m.group(1) == "def" else "class"
        prompt = f"Show the {kind} `{m.group(2)}` from Python's `{module}` module."
        out.append(_pair("code", f"stdlib:{module}", prompt, _cut(block, args.max_chars), module=module))
    return out


def doc_records(args: CorpusArgs) -> list[dict]:
    from pydoc_data.topics import topics

    chunks = []
    for key in sorted(topics):
        paras = [p.strip() for p in topics[key].split("\n\n") if p.strip()]
        buf = ""
        for p in paras:
            if buf and len(buf) + len(p) > args.max_chars:
                chunks.append((key, buf))
                buf = ""
            buf = (buf + "\n\n" + p).strip()
        if buf:
            chunks.append((key, buf))
    chunks = [(k, _cut(c, args.max_chars)) for k, c in chunks if len(c) >= args.min_chars]
    rng = random.Random(args.seed + 1)
    rng.shuffle(chunks)
    return [_pair("docs", f"pydoc_data.topics:{k}", f"Explain the Python documentation topic '{k}'.", c, topic=k)
            for k, c in chunks[: args.docs]]


def chat_records(stats: ReadStats) -> list[dict]:
    recs = read_pairs(CHAT_PAIRS, stats)
    for r in recs:
        r["format"] = "chat"
    return recs


def default_records(args: CorpusArgs | None = None, stats: ReadStats | None = None) -> list[dict]:
    """The whole default corpus as records (code, docs, chat)."""
    args = args or CorpusArgs()
    stats = stats or ReadStats()
    return code_records(args) + doc_records(args) + chat_records(stats)


def control_texts() -> list[str]:
    """General-text control paragraphs (fixtures/corpus/control.jsonl): prose unrelated to the corpus,
    used to check that the adapter does not damage general language modelling."""
    import json
    return [json.loads(line)["text"] for line in CONTROL.read_text().splitlines() if line.strip()]
