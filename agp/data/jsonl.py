"""Tolerant JSONL reading: a malformed line is counted with its file and line number, the rest is read."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

MAX_LOCATIONS = 50   # how many bad-line locations a report keeps (the count is always exact)
MAX_DEPTH = 64       # nesting a transcript line may have; deeper is a hostile or broken line
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


@dataclass
class ReadStats:
    """Bad lines seen while reading, with where they were (file:line: reason)."""
    malformed: int = 0
    locations: list[str] = field(default_factory=list)

    def bad(self, path, lineno: int, why: str) -> None:
        self.malformed += 1
        if len(self.locations) < MAX_LOCATIONS:
            self.locations.append(f"{path}:{lineno}: {why}")


def read_jsonl(path: str | Path, stats: ReadStats):
    """Yield (line_number, object) for every JSON-object line; blank lines are skipped,
    undecodable or non-object lines are recorded in `stats` and skipped. A file that cannot be
    opened (a dangling symlink, a directory named *.jsonl, no permission) counts as one bad line 0."""
    path = Path(path)
    if path.exists() and not path.is_file():   # a FIFO or device named *.jsonl would block or never end
        stats.bad(path, 0, "not a regular file")
        return
    try:
        f = open(path, "rb")
    except OSError as e:
        stats.bad(path, 0, f"cannot read the file ({e.strerror or type(e).__name__})")
        return
    with f:
        try:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                obj, why = parse_line(raw)
                if why:
                    stats.bad(path, lineno, why)
                    continue
                yield lineno, obj
        except OSError as e:  # the file vanished or became unreadable half-way
            stats.bad(path, 0, f"read failed ({e.strerror or type(e).__name__}); the rest of the file is skipped")


def parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """(object, None) for a usable JSONL line, else (None, why it is malformed)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not utf-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, f"nested deeper than the JSON reader allows (limit {MAX_DEPTH} levels)"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    # cheap byte screens first: almost every line has neither deep nesting nor \ud8xx escapes
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(obj) > MAX_DEPTH:
        return None, f"nested deeper than {MAX_DEPTH} levels"
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(obj):
        return None, "holds a lone UTF-16 surrogate (\\ud800-\\udfff) that is not text"
    return obj, None


def _children(value):
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    return value if isinstance(value, list) else ()


def _depth(obj) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in _children(value))
    return deepest


def _has_lone_surrogate(obj) -> bool:
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        else:
            stack.extend(_children(value))
    return False
