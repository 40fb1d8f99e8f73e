"""Loading vectors for the index: NumPy arrays, `.npy` files and JSONL, checked row by row.

Every row is L2-normalised on load (the index ranks by inner product of unit vectors, i.e. cosine).
Bad input never yields a silently wrong index: ragged rows, NaN/inf, zero rows, a wrong dimension or
an empty file each raise one AGPError naming the file and the row (1-based line for JSONL).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from agp.errors import AGPError

# JSONL rows may carry the vector under any of these keys (first match wins), or be a bare JSON array.
VECTOR_KEYS = ("embedding", "vector", "values", "embedding_vector")


def _where(source: str, row: int, jsonl: bool = False) -> str:
    return f"{source} line {row + 1}" if jsonl else f"{source} row {row}"


def check_rows(x, source: str = "<array>", dim: int | None = None, normalise: bool = True,
               jsonl: bool = False) -> np.ndarray:
    """Validate a [N, d] array (finite, non-zero rows, expected dim) and return float32 unit rows."""
    x = np.asarray(x)
    if x.dtype == object:
        raise AGPError(f"{source}: rows have different lengths (ragged); every vector must have the same dimension")
    if x.ndim == 1 and x.size and dim is not None and x.size == dim:
        x = x[None, :]
    if x.ndim != 2:
        raise AGPError(f"{source}: expected a 2-D array [rows, dim], got shape {x.shape}")
    if x.shape[0] == 0:
        raise AGPError(f"{source}: no vectors (empty input); give at least one row")
    if x.shape[1] == 0:
        raise AGPError(f"{source}: vectors have dimension 0")
    if dim is not None and x.shape[1] != dim:
        raise AGPError(f"{source}: vectors have dimension {x.shape[1]} but the index holds dimension {dim}; "
                       f"embed with the same model as the index")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise AGPError(f"{source}: vectors must be numbers, got dtype {x.dtype}")
    x = np.asarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        r = int(np.argmax(bad))
        raise AGPError(f"{_where(source, r, jsonl)}: vector holds NaN or inf ({int(bad.sum())} bad rows); "
                       f"fix or drop those rows")
    if not normalise:
        return np.ascontiguousarray(x)
    norms = np.linalg.norm(x, axis=1)
    zero = ~(norms > 0)
    if zero.any():
        r = int(np.argmax(zero))
        raise AGPError(f"{_where(source, r, jsonl)}: zero vector cannot be normalised for cosine search; drop it")
    return np.ascontiguousarray(x / norms[:, None], dtype=np.float32)


def _jsonl_rows(path: Path):
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AGPError(f"{path} line {i + 1}: not valid JSON ({e.__class__.__name__}: {e}); "
                               f"one JSON object or array per line") from None
            if isinstance(obj, dict):
                key = next((k for k in VECTOR_KEYS if k in obj), None)
                if key is None:
                    raise AGPError(f"{path} line {i + 1}: no vector field; expected one of {', '.join(VECTOR_KEYS)} "
                                   f"or a bare JSON array")
                obj = obj[key]
            if not isinstance(obj, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in obj):
                raise AGPError(f"{path} line {i + 1}: the vector must be a flat JSON array of numbers")
            yield i, obj


def read_jsonl(path, dim: int | None = None) -> np.ndarray:
    """Read a JSONL file of vectors (see VECTOR_KEYS) into float32 unit rows."""
    path = Path(path)
    rows, width = [], dim
    for i, v in _jsonl_rows(path):
        if width is None:
            width = len(v)
        if len(v) != width:
            what = "the index" if dim is not None else f"the first row ({width})"
            raise AGPError(f"{path} line {i + 1}: vector has {len(v)} values but {what} has dimension {width}; "
                           f"rows must all have the same dimension")
        if len(v) == 0:
            raise AGPError(f"{path} line {i + 1}: empty vector")
        rows.append(v)
    if not rows:
        raise AGPError(f"{path}: no vectors (empty file); give at least one row")
    arr = np.asarray(rows, dtype=np.float64)
    bad = ~np.isfinite(arr).all(axis=1)  # JSON itself has no NaN, but Python's parser accepts NaN/Infinity
    if bad.any():
        # map back to the line number: rows were taken in order, blank lines skipped
        line = [i for i, _ in _jsonl_rows(path)][int(np.argmax(bad))]
        raise AGPError(f"{path} line {line + 1}: vector holds NaN or inf; fix or drop that row")
    return check_rows(arr, str(path), dim, jsonl=True)


def load_vectors(src, dim: int | None = None) -> np.ndarray:
    """Vectors from an array, a `.npy` file, or a `.jsonl`/`.json` file, as float32 unit rows [N, d]."""
    if isinstance(src, np.ndarray) or isinstance(src, (list, tuple)):
        return check_rows(src, "<array>", dim)
    path = Path(src)
    if not path.exists():
        raise AGPError(f"{path}: no such file; give a .npy or .jsonl file of vectors")
    if path.stat().st_size == 0:
        raise AGPError(f"{path}: empty file; give at least one vector")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise AGPError(f"{path}: not a readable .npy array ({e}); write it with numpy.save") from None
        return check_rows(arr, str(path), dim)
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path, dim)
    raise AGPError(f"{path}: unknown vector file type {path.suffix!r}; use .npy or .jsonl")
