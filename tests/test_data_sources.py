"""Source readers on the fixture transcripts: every format, format detection, malformed lines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agp.data.jsonl import ReadStats, read_jsonl
from agp.data.sources import detect_format, read_source
from agp.errors import AGPError

FX = Path(__file__).resolve().parents[1] / "fixtures" / "transcripts"


def _read(name):
    stats = ReadStats()
    recs, formats = read_source(FX / name, stats)
    return recs, formats, stats


def test_claude_session_exchanges_keep_tools_thinking_and_summary():
    recs, formats, stats = _read("claude_session.jsonl")
    assert formats[str(FX / "claude_session.jsonl")] == "claude_session"
    first = recs[0]
    assert first["prompt"].startswith("The checkout integration test fails")
    kinds = [t["kind"] for t in first["turns"]]
    assert {"text", "thinking", "tool_use", "tool_result"} <= set(kinds)
    assert kinds.count("tool_use") == 3
    assert "bounded polling" in first["response"] and "Probably a timing issue" not in first["response"]
    assert first["meta"]["summary"].startswith("Fix flaky checkout")
    assert first["origin"].endswith("claude_session.jsonl:3-10")
    # the cut-off line is reported with file and line, and the rest still read
    assert stats.malformed == 1 and stats.locations[0].startswith(f"{FX / 'claude_session.jsonl'}:17:")
    assert any(r["prompt"].startswith("Please add retries") for r in recs)


def test_prompt_logs_codex_pairs_and_chat():
    recs, formats, stats = _read(".")
    by = {Path(k).name: v for k, v in formats.items()}
    assert by == {"chat.jsonl": "chat", "claude_session.jsonl": "claude_session",
                  "claude_subagent.jsonl": "claude_session", "codex_history.jsonl": "codex_history",
                  "pairs.jsonl": "pairs", "prompts-all.jsonl": "prompt_log", "verbose-all.jsonl": "prompt_log"}
    logs = [r for r in recs if r["format"] == "prompt_log"]
    assert all(r["response"] is None for r in logs)
    scored = next(r for r in logs if r["prompt"].startswith("Refactor the order service"))
    assert scored["meta"]["scores"]["clarity"] == 0.9 and scored["meta"]["session_id"] == "s-77"
    assert any(r["format"] == "codex_history" and "swallow exceptions" in r["prompt"] for r in recs)
    pair = next(r for r in recs if r["format"] == "pairs" and "undo the last git commit" in r["prompt"])
    assert pair["response"].startswith("Run `git reset --soft")      # "completion" accepted as the response
    chat = [r for r in recs if r["format"] == "chat"]
    assert len(chat) == 3 and chat[0]["meta"]["system"].startswith("You are a helpful reviewer")
    assert chat[2]["prompt"].startswith("Why did the deploy shift")  # content-part lists are read
    assert stats.malformed == 3
    where = " ".join(stats.locations)
    assert "pairs.jsonl:4:" in where and "verbose-all.jsonl:5: expected a JSON object" in where


def test_detect_format():
    assert detect_format({"type": "summary", "summary": "x"}) == "claude_session"
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"prompt": "a", "response": "b"}) == "pairs"
    assert detect_format({"session_id": "s", "ts": 1, "text": "t"}) == "codex_history"
    assert detect_format({"display": "d", "timestamp": 1}) == "prompt_log"
    assert detect_format({"foo": 1}) is None


def test_read_jsonl_counts_bad_lines(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"a": 1}\n\nnot json\n[1]\n\xff\xfe\n{"b": 2}\n')
    stats = ReadStats()
    got = list(read_jsonl(p, stats))
    assert [n for n, _ in got] == [1, 6]
    assert stats.malformed == 3
    assert [loc.split(":")[1] for loc in stats.locations] == ["3", "4", "5"]


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(AGPError, match="does not exist"):
        read_source(tmp_path / "nope", ReadStats())
    with pytest.raises(AGPError, match="no \\*.jsonl files"):
        read_source(tmp_path, ReadStats())


def test_unknown_format_file_is_listed_not_read(tmp_path):
    (tmp_path / "odd.jsonl").write_text(json.dumps({"foo": 1}) + "\n")
    recs, formats = read_source(tmp_path, ReadStats())
    assert recs == [] and list(formats.values()) == [None]
