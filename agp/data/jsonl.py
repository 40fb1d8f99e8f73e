"""Tolerant JSONL reading: a malformed line is counted with its file and line number, the rest is read."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agp.io import json_lines

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
    for lineno, obj, why in json_lines(path):
        if why:
            stats.bad(path, lineno, why)
            continue
        yield lineno, obj
