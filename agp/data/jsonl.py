"""Tolerant JSONL reading: a malformed line is counted with its file and line number, the rest is read."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MAX_LOCATIONS = 50   # how many bad-line locations a report keeps (the count is always exact)


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
    undecodable or non-object lines are recorded in `stats` and skipped."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                stats.bad(path, lineno, f"not utf-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                stats.bad(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                stats.bad(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield lineno, obj
