"""Atomic file writes and content hashes: a crash never leaves a half-written file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A symlink is written through: the file it points at is replaced and the link stays. The
    result keeps the mode of the file it replaces (a new file gets the umask's default), since
    mkstemp's private 0600 would otherwise leak into every rewritten file."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _mode_for(path))
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _mode_for(path: Path) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


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


def read_trained_module(d, weights: str, meta: str, fingerprint: str, what: str, fix: str) -> tuple[dict, dict]:
    """(description, arrays) of a small trained module saved as `weights` (safetensors) + `meta`
    (JSON) in `d`; refused with one line naming `what` and `fix` when missing, unreadable, trained
    for another model (`model_fingerprint`) or holding non-finite values."""
    import json

    import mlx.core as mx

    from agp.errors import AGPError
    d = Path(d)
    if not (d / meta).exists() or not (d / weights).exists():
        raise AGPError(f"no {what} at {d}; {fix}")
    try:
        desc = json.loads((d / meta).read_text())
        arrays = mx.load(str(d / weights))
    except (OSError, ValueError, RuntimeError) as e:
        raise AGPError(f"{what} at {d} is unreadable ({type(e).__name__}); {fix}") from None
    if desc.get("model_fingerprint") != fingerprint:
        raise AGPError(f"the {what} at {d} was trained for another model (fingerprint "
                       f"{str(desc.get('model_fingerprint'))[:12]}, this backbone {fingerprint[:12]}); {fix} for this model")
    for k, v in arrays.items():
        if not bool(mx.all(mx.isfinite(v)).item()):
            raise AGPError(f"{what} at {d} has non-finite values in '{k}'; it is corrupt: {fix}")
    return desc, arrays


MAX_JSON_DEPTH = 64  # nesting a JSONL line may have; deeper is a hostile or broken line
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def json_lines(path, objects_only: bool = True):
    """The one JSONL parser: yield (line number, value, None) for each JSON line, or (line number,
    None, reason) for one that is not utf-8, not JSON, nested past MAX_JSON_DEPTH, holds a lone
    surrogate or (with objects_only) is not an object. Blank lines are skipped. Callers choose the
    policy: count and go on, or refuse the file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            value, why = parse_json_line(raw, objects_only)
            yield lineno, value, why


def parse_json_line(raw: bytes, objects_only: bool = True):
    """(value, None) for a usable JSON line, else (None, why it is malformed)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not utf-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, f"nested deeper than the JSON reader allows (limit {MAX_JSON_DEPTH} levels)"
    if objects_only and not isinstance(value, dict):
        return None, f"expected a JSON object, got {type(value).__name__}"
    # cheap byte screens first: almost every line has neither deep nesting nor \ud8xx escapes
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        return None, f"nested deeper than {MAX_JSON_DEPTH} levels"
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        return None, "holds a lone UTF-16 surrogate (\\ud800-\\udfff) that is not text"
    return value, None


def _children(value):
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    return value if isinstance(value, list) else ()


def _depth(value) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in _children(item))
    return deepest


def _has_lone_surrogate(value) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        else:
            stack.extend(_children(item))
    return False


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


def json_safe(value):
    """Metrics made JSON-safe: NaN/inf -> None, numpy -> python, tuple keys -> strings."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


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
