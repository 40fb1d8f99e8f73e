"""The offline prompt pack: real local text every machine has, split by content hash.

Three sources: `code` (Python standard-library source, cut at top-level `def`/`class`),
`docs` (documentation prose from `pydoc_data.topics`), `chat` (conversational and planning
prompts kept in fixtures/prompts/chat.jsonl). Selection is deterministic: sources are read in
sorted order and sampled with a seeded RNG, so the same interpreter version yields the same pack.
"""
from __future__ import annotations

import json
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from agp.config import ConfigMixin
from agp.data.splits import content_id, split_of

CHAT_FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "prompts" / "chat.jsonl"
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "__pycache__"}


@dataclass
class PromptPackArgs(ConfigMixin):
    per_source: int = 12     # prompts per source (code, docs, chat)
    max_chars: int = 400     # cut each prompt to this many characters (at a line end when possible)
    min_chars: int = 80
    seed: int = 0


def _cut(text: str, max_chars: int) -> str:
    text = text.strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut if cut > max_chars // 2 else max_chars].rstrip()


def code_chunks(args: PromptPackArgs) -> list[str]:
    """Top-level functions/classes from the standard library's pure-Python modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py")) + sorted(
        p for p in root.glob("*/*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts)))
    rng = random.Random(args.seed)
    rng.shuffle(files)
    out: list[str] = []
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        blocks = re.split(r"\n(?=(?:def|class) )", src)
        blocks = [b for b in blocks[1:] if len(b) >= args.min_chars]
        if blocks:
            out.append(_cut(rng.choice(blocks), args.max_chars))
        if len(out) >= args.per_source:
            break
    return out


def doc_chunks(args: PromptPackArgs) -> list[str]:
    """Documentation prose from pydoc_data.topics (the language reference)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    rng = random.Random(args.seed + 1)
    rng.shuffle(keys)
    out = []
    for k in keys:
        text = topics[k].strip()
        if len(text) >= args.min_chars:
            out.append(_cut(text, args.max_chars))
        if len(out) >= args.per_source:
            break
    return out


def chat_prompts(args: PromptPackArgs) -> list[str]:
    """Conversational / planning prompts from the fixture file."""
    rows = [json.loads(line) for line in CHAT_FIXTURE.read_text().splitlines() if line.strip()]
    rng = random.Random(args.seed + 2)
    rng.shuffle(rows)
    return [_cut(r["prompt"], args.max_chars) for r in rows[: args.per_source]]


def build_prompt_pack(args: PromptPackArgs | None = None) -> list[dict]:
    """Records {id, source, text, split}, deduplicated by content."""
    args = args or PromptPackArgs()
    seen, out = set(), []
    for source, fn in (("code", code_chunks), ("docs", doc_chunks), ("chat", chat_prompts)):
        for text in fn(args):
            cid = content_id(text)
            if cid not in seen:
                seen.add(cid)
                out.append({"id": cid, "source": source, "text": text, "split": split_of(text)})
    return out
