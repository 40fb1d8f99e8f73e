"""Atomic file writes and content hashes: a crash never leaves a half-written file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a fresh temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path, data: bytes) -> None:
    """Atomically write bytes."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path, text: str) -> None:
    """Atomically write text (utf-8)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
    """Atomically write JSON, pretty-printed and key-sorted."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def write_jsonl(path, rows) -> None:
    """Atomically write one JSON object per line."""
    write_text(path, "".join(json.dumps(r, sort_keys=True, default=_jsonable) + "\n" for r in rows))


def write_safetensors(path, arrays: dict, metadata: dict | None = None) -> None:
    """Atomic mx.save_safetensors. MLX appends ".safetensors" to a name without it, so the
    temporary file carries that suffix and is renamed into place only once fully written."""
    import mlx.core as mx

    with atomic_path(path) as tmp:
        named = tmp.with_suffix(".safetensors")
        try:
            mx.save_safetensors(str(named), arrays, **({"metadata": metadata} if metadata else {}))
            os.replace(named, tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(named)


def json_lines(path, objects_only: bool = True):
    """The one JSONL parser: yield (line number, value, None) for each JSON line, or (line number,
    None, reason) for one that is not utf-8, not JSON or (with objects_only) not an object. Blank
    lines are skipped. Callers choose the policy: count and go on, or refuse the file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield lineno, None, f"not utf-8 ({e.reason} at byte {e.start})"
                continue
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            if objects_only and not isinstance(value, dict):
                yield lineno, None, f"expected a JSON object, got {type(value).__name__}"
                continue
            yield lineno, value, None


def read_jsonl(path, fix: str) -> list[dict]:
    """Every object of a JSONL file that must be whole; the first bad line is an AGPError naming
    `path:line`, the reason and `fix` (what the user should do)."""
    from agp.errors import AGPError

    rows = []
    for lineno, row, why in json_lines(path):
        if why:
            raise AGPError(f"{path}:{lineno}: {why}; {fix}")
        rows.append(row)
    return rows


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()
