"""Hypothesis campaign over the data readers (issue 13): random JSON shaped like every source
format, random bytes and deep nesting. Whatever the lines hold, `agp data build` either builds or
raises AGPError (never another exception), and touches nothing outside its output directory."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agp.data.build import DataArgs, build
from agp.data.jsonl import ReadStats, read_jsonl
from agp.data.sources import FORMATS, read_source
from agp.errors import AGPError

# every key a reader looks at, so random objects reach deep into each reader's branches
KEYS = ["type", "message", "role", "content", "text", "thinking", "name", "input", "tool_use_id", "is_error",
        "summary", "messages", "prompt", "response", "completion", "output", "answer", "session_id", "ts",
        "timestamp", "display", "scores", "tags", "isMeta", "isSidechain", "sessionId", "cwd", "pastedContents"]
WORDS = ["user", "assistant", "system", "summary", "tool", "text", "thinking", "tool_use", "tool_result",
         "explain the retry loop please", "\ud800", "sk-ant-api03-" + "x" * 24, "", "ok"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.sampled_from(WORDS), st.text(max_size=30))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5)),
    max_leaves=25)
objects = st.dictionaries(st.sampled_from(KEYS), json_values, min_size=1, max_size=8)


def _deep(depth: int, kind: str) -> str:
    if kind == "list":
        return '{"prompt": ' + "[" * depth + "]" * depth + ', "response": "x"}'
    return '{"messages": [' + '{"content": ' * depth + '"x"' + "}" * depth + "]}"


lines = st.one_of(
    objects.map(lambda o: json.dumps(o, ensure_ascii=True).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")),
    st.tuples(st.sampled_from([70, 999, 1000, 5000]), st.sampled_from(["list", "dict"])).map(
        lambda t: _deep(*t).encode()),
)


GOOD = json.dumps({"prompt": "Explain the retry loop in the uploader module",
                   "response": "It retries three times with exponential backoff, then gives up."}).encode()


def _snapshot(root: Path, skip: Path) -> dict:
    return {str(p): (p.lstat().st_mode, p.read_bytes() if p.is_file() else None) for p in root.rglob("*")
            if skip not in p.parents and p != skip}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines, min_size=1, max_size=12), st.sampled_from([None, *FORMATS]))
def test_build_raises_only_agp_errors_and_writes_only_out(raw_lines, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "src"
        src.mkdir()
        (src / "a.jsonl").write_bytes(b"\n".join(raw_lines) + b"\n")
        (src / "b.jsonl").write_bytes(b"\n".join([GOOD, *raw_lines]) + b"\n")   # so most builds get written
        (src / "dangling.jsonl").symlink_to(root / "nowhere.jsonl")
        out = root / "out"
        before = _snapshot(root, out)
        try:
            man = build(DataArgs(source=str(src), format=fmt), out)
        except AGPError as e:
            assert "\n" not in str(e)
        else:
            assert man["read"]["malformed"] >= 1   # at least the dangling symlink
            json.dumps(man)
        assert _snapshot(root, out) == before


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_reader_counts_random_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        path.write_bytes(data)
        stats = ReadStats()
        rows = list(read_jsonl(path, stats))
        assert stats.malformed + len(rows) <= data.count(b"\n") + 1
        records, _ = read_source(path, ReadStats())
        assert isinstance(records, list)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(json_values.map(lambda v: json.dumps(v).encode()),
                          st.lists(st.one_of(st.floats(), st.integers(-10**400, 10**400)), min_size=1, max_size=4)
                          .map(lambda v: json.dumps(v).encode()),
                          st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")),
                          st.just(b"[" * 5000 + b"]" * 5000)), min_size=1, max_size=6))
def test_index_vector_reader_raises_only_agp_errors(raw_lines):
    from agp.index.loader import load_vectors
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.jsonl"
        path.write_bytes(b"\n".join(raw_lines) + b"\n")
        try:
            rows = load_vectors(path)
        except AGPError as e:
            assert "\n" not in str(e)
        else:
            assert rows.ndim == 2 and bool((abs((rows ** 2).sum(axis=1) - 1) < 1e-3).all())
