"""Tolerant JSONL reading: a malformed line is counted with its file and line number, the rest is read."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agp.io import MAX_JSON_DEPTH, json_lines

MAX_LOCATIONS = 50   # how many bad-line locations a report keeps (the count is always exact)
MAX_DEPTH = MAX_JSON_DEPTH  # the reader's nesting bound (agp.data.filters relies on it)


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
        lines = json_lines(path)
        for lineno, obj, why in lines:
            if why:
                stats.bad(path, lineno, why)
                continue
            yield lineno, obj
    except OSError as e:  # unreadable from the start, or vanished half-way
        stats.bad(path, 0, f"cannot read the file ({e.strerror or type(e).__name__}); the rest of it is skipped")
