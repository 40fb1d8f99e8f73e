"""Source readers: every input format becomes the same record shape.

A record is a dict:
  format    which reader made it (claude_session, prompt_log, codex_history, pairs, chat, code, docs)
  origin    "file:line" (or "file:first-last" for a session exchange) so any row can be traced back
  prompt    the user's text ("" when there is none, e.g. a tool-only exchange)
  response  the assistant's visible text, or None for prompt-only sources (prompt logs, histories)
  turns     the exchange in order, process detail kept: [{"role", "kind", "text", "tool"?}] with kind in
            text | tool_use | tool_result | thinking (the routing lane renders these)
  meta      source metadata worth keeping (session, timestamp, cwd, scores, model, ...)

Formats are recognised per file from its first valid object (`detect_format`), so a source
directory may mix them. Directory walking is sorted, so builds are deterministic.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from agp.data.jsonl import ReadStats, read_jsonl
from agp.errors import AGPError

FORMATS = ("claude_session", "prompt_log", "codex_history", "pairs", "chat")
_CLAUDE_TYPES = {"user", "assistant", "summary", "system", "file-history-snapshot", "progress"}
TOOL_TEXT_MAX = 600   # tool inputs/results are clipped to this many characters in turns


def _str(value) -> str:
    """`value` if it is a string, else "": a field of the wrong JSON type carries no text."""
    return value if isinstance(value, str) else ""


def detect_format(obj: dict) -> str | None:
    """Name of the format whose rows look like `obj`, or None."""
    if isinstance(obj.get("type"), str) and obj["type"] in _CLAUDE_TYPES and ("message" in obj or obj["type"] in ("summary", "system")):
        return "claude_session"
    if isinstance(obj.get("messages"), list):
        return "chat"
    if "prompt" in obj and any(k in obj for k in ("response", "completion", "output", "answer")):
        return "pairs"
    if "session_id" in obj and "text" in obj and ("ts" in obj or "timestamp" in obj):
        return "codex_history"
    if any(isinstance(obj.get(k), str) for k in ("prompt", "display", "text", "input")):
        return "prompt_log"
    return None


_TOKEN_TAIL = re.compile(r"[A-Za-z0-9_\-+/=.]+$")


def _clip(s: str, n: int = TOOL_TEXT_MAX) -> str:
    """First n chars; a token cut by the limit is dropped whole, since the cut half of a key
    (AKIA… with 10 of its 16 chars) no longer matches a redaction pattern but still leaks."""
    if len(s) <= n:
        return s
    head = s[:n] if not s[n].isalnum() and s[n] not in "_-+/=." else _TOKEN_TAIL.sub("", s[:n])
    return head + f" …[{len(s) - len(head)} more chars]"


def _block_text(content) -> str:
    """Text of a tool_result's content (str or list of blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_str(b.get("text")) if isinstance(b, dict) else json.dumps(b) for b in content)
    return "" if content is None else json.dumps(content, sort_keys=True)


def _claude_turns(obj: dict) -> list[dict]:
    """Turns of one Claude Code message line (content may be a string or a list of blocks)."""
    msg = obj.get("message")
    msg = msg if isinstance(msg, dict) else {}
    role = _str(msg.get("role")) or _str(obj.get("type"))
    content = msg.get("content")
    if isinstance(content, str):
        return [{"role": role, "kind": "text", "text": content}]
    turns = []
    for b in content if isinstance(content, list) else []:
        if not isinstance(b, dict):
            continue
        kind = b.get("type")
        if kind == "text":
            turns.append({"role": role, "kind": "text", "text": _str(b.get("text"))})
        elif kind == "thinking":
            turns.append({"role": role, "kind": "thinking", "text": _str(b.get("thinking"))})
        elif kind == "tool_use":
            turns.append({"role": role, "kind": "tool_use", "tool": _str(b.get("name")) or "?",
                          "text": _clip(json.dumps(b.get("input", {}), sort_keys=True))})
        elif kind == "tool_result":
            turns.append({"role": role, "kind": "tool_result", "tool": _str(b.get("tool_use_id")) or "?",
                          "text": _clip(_block_text(b.get("content"))), "is_error": bool(b.get("is_error"))})
    return turns


def read_claude_session(path: Path, stats: ReadStats) -> list[dict]:
    """One record per exchange: a user text turn and everything up to the next user text turn.
    Summary and system lines become metadata of the session, not exchanges."""
    records, cur, summaries = [], None, []
    for lineno, obj in read_jsonl(path, stats):
        t = obj.get("type")
        if t == "summary":
            summaries.append(str(obj.get("summary", "")))
            continue
        if t not in ("user", "assistant"):
            continue   # system / snapshot / progress lines carry no conversation
        turns = _claude_turns(obj)
        starts = t == "user" and any(x["kind"] == "text" for x in turns)
        if starts or cur is None:
            if cur is not None:
                records.append(cur)
            cur = {"format": "claude_session", "origin": f"{path}:{lineno}", "_first": lineno, "turns": [],
                   "meta": {k: obj[k] for k in ("sessionId", "timestamp", "cwd", "isSidechain", "isMeta")
                            if k in obj}}
        cur["turns"].extend(turns)
        cur["_last"] = lineno
    if cur is not None:
        records.append(cur)
    for r in records:
        first, last = r.pop("_first"), r.pop("_last")
        r["origin"] = f"{path}:{first}" + (f"-{last}" if last != first else "")
        r["prompt"] = "\n".join(x["text"] for x in r["turns"] if x["role"] == "user" and x["kind"] == "text").strip()
        r["response"] = "\n".join(x["text"] for x in r["turns"]
                                  if x["role"] == "assistant" and x["kind"] == "text").strip()
        if summaries:
            r["meta"]["summary"] = summaries[-1]
    return records


def _scalar_meta(obj: dict, skip: set) -> dict:
    return {k: v for k, v in obj.items() if k not in skip and isinstance(v, (str, int, float, bool, type(None)))
            or (k in ("scores", "score", "tags") and k not in skip)}


def read_prompt_log(path: Path, stats: ReadStats) -> list[dict]:
    """verbose-all / prompts-all style logs: one prompt per line with metadata and scores."""
    out = []
    for lineno, obj in read_jsonl(path, stats):
        key = next((k for k in ("prompt", "display", "text", "input") if isinstance(obj.get(k), str)), None)
        if key is None:
            stats.bad(path, lineno, "prompt-log row without a prompt/display/text field")
            continue
        out.append({"format": "prompt_log", "origin": f"{path}:{lineno}", "prompt": obj[key].strip(),
                    "response": None, "turns": [{"role": "user", "kind": "text", "text": obj[key]}],
                    "meta": _scalar_meta(obj, {key, "pastedContents"})})
    return out


def read_codex_history(path: Path, stats: ReadStats) -> list[dict]:
    """Codex prompt history (`~/.codex/history.jsonl`): {"session_id", "ts", "text"} per line."""
    out = []
    for lineno, obj in read_jsonl(path, stats):
        if not isinstance(obj.get("text"), str):
            stats.bad(path, lineno, "codex history row without a text field")
            continue
        out.append({"format": "codex_history", "origin": f"{path}:{lineno}", "prompt": obj["text"].strip(),
                    "response": None, "turns": [{"role": "user", "kind": "text", "text": obj["text"]}],
                    "meta": _scalar_meta(obj, {"text"})})
    return out


def read_pairs(path: Path, stats: ReadStats) -> list[dict]:
    """Generic {"prompt": ..., "response": ...} rows (also completion/output/answer)."""
    out = []
    for lineno, obj in read_jsonl(path, stats):
        rkey = next((k for k in ("response", "completion", "output", "answer") if k in obj), None)
        p, r = obj.get("prompt"), obj.get(rkey) if rkey else None
        if not isinstance(p, str) or not isinstance(r, str):
            stats.bad(path, lineno, "pair row needs string 'prompt' and 'response' fields")
            continue
        out.append({"format": "pairs", "origin": f"{path}:{lineno}", "prompt": p.strip(), "response": r.strip(),
                    "turns": [{"role": "user", "kind": "text", "text": p},
                              {"role": "assistant", "kind": "text", "text": r}],
                    "meta": _scalar_meta(obj, {"prompt", rkey})})
    return out


def _message_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # OpenAI-style content parts
        return "\n".join(_str(p.get("text")) for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


def read_chat(path: Path, stats: ReadStats) -> list[dict]:
    """Chat-messages rows {"messages": [{"role", "content"}, ...]}: one record per user turn and the
    assistant replies after it; system messages go to metadata."""
    out = []
    for lineno, obj in read_jsonl(path, stats):
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            stats.bad(path, lineno, "chat row needs a 'messages' list of {role, content} objects")
            continue
        system = "\n".join(_message_text(m.get("content")) for m in msgs if m.get("role") == "system")
        cur = None
        for i, m in enumerate(msgs):
            role, text = m.get("role"), _message_text(m.get("content"))
            if role == "user":
                if cur:
                    out.append(cur)
                cur = {"format": "chat", "origin": f"{path}:{lineno}#{i}", "prompt": text.strip(), "response": "",
                       "turns": [], "meta": {"system": system} if system else {}}
            if cur is None or role not in ("user", "assistant", "tool"):
                continue
            kind = "tool_result" if role == "tool" else "text"
            cur["turns"].append({"role": role if role != "tool" else "user", "kind": kind, "text": text})
            if role == "assistant":
                cur["response"] = (cur["response"] + "\n" + text).strip()
        if cur:
            out.append(cur)
    return out


READERS = {"claude_session": read_claude_session, "prompt_log": read_prompt_log,
           "codex_history": read_codex_history, "pairs": read_pairs, "chat": read_chat}


def sniff(path: Path, stats: ReadStats) -> str | None:
    """Format of a file from its first valid object (bad lines before it are not counted twice)."""
    probe = ReadStats()
    for _, obj in read_jsonl(path, probe):
        return detect_format(obj)
    return None


def read_source(source: str | Path, stats: ReadStats, fmt: str | None = None) -> tuple[list[dict], dict]:
    """All records under a directory (recursively, *.jsonl) or from one file.
    Returns (records, {file: format}); unknown-format files are listed with format None."""
    source = Path(source).expanduser()
    if not source.exists():
        raise AGPError(f"source {source} does not exist; pass a directory of *.jsonl transcripts "
                       f"or omit --source to use the offline default corpus")
    files = [source] if source.is_file() else sorted(source.rglob("*.jsonl"))
    if not files:
        raise AGPError(f"source directory {source} has no *.jsonl files; put transcripts (Claude Code sessions, "
                       f"prompt logs, prompt/response or chat JSONL) there")
    records, formats = [], {}
    for f in files:
        kind = fmt or sniff(f, stats)
        formats[str(f)] = kind
        if kind is None:
            # still read it so its malformed lines are reported
            for _ in read_jsonl(f, stats):
                pass
            continue
        if kind not in READERS:
            raise AGPError(f"unknown source format '{kind}'; choose one of {', '.join(FORMATS)}")
        records.extend(READERS[kind](f, stats))
    return records, formats
