"""Load vectors for the index from a NumPy array, an `.npy` file or JSONL, checking every row.

JSONL rows may be a bare JSON array or an object carrying the vector under one of KEYS. Rows are
L2-normalised on load (the index ranks by inner product of unit vectors = cosine). Every problem is
an AGPError naming the file and the row (1-based line for JSONL, 0-based row for arrays).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from agp.errors import AGPError
from agp.io import json_lines

KEYS = ("embedding", "vector", "values", "embedding_vector")


def _row_vector(obj, where: str):
    if isinstance(obj, dict):
        for k in KEYS:
            if k in obj:
                return obj[k]
        raise AGPError(f"{where}: object has none of the keys {', '.join(KEYS)}; put the vector under one of them")
    return obj


def read_jsonl(path: Path) -> np.ndarray:
    """Rows of a JSONL file -> float32 [N, d] (not normalised)."""
    rows, dim = [], None
    for lineno, value, why in json_lines(path, objects_only=False):
        where = f"{path}:{lineno}"
        if why:
            raise AGPError(f"{where}: not valid JSON: {why}; write one JSON array or object per line")
        vec = _row_vector(value, where)
        if not isinstance(vec, list) or not vec or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vec):
            raise AGPError(f"{where}: the vector must be a non-empty JSON array of numbers")
        if dim is None:
            dim = len(vec)
        elif len(vec) != dim:
            raise AGPError(f"{where}: ragged row of length {len(vec)}, earlier rows have {dim}; every row needs the same length")
        rows.append(vec)
    if not rows:
        raise AGPError(f"{path}: no vectors (empty file); give at least one row")
    try:
        with np.errstate(over="ignore"):   # values beyond float32 become inf: check_rows names the row
            return np.asarray(rows, dtype=np.float32)
    except OverflowError:
        raise AGPError(f"{path}: a value is an integer too large for a float; write the vectors as floats") from None


def check_rows(x, source: str, dim: int | None = None, first_row: int = 0) -> np.ndarray:
    """Validate a [N, d] array (finite, non-zero rows, expected dim) and return unit rows, float32."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):   # float64 beyond float32 becomes inf: refused below
            x = np.asarray(x, dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as e:
        raise AGPError(f"{source}: cannot read as a float array ({e}); rows must all have the same length") from None
    if x.ndim == 1 and x.size:
        x = x[None, :]
    if x.ndim != 2:
        raise AGPError(f"{source}: expected a 2-D array [rows, dim], got shape {x.shape}")
    if x.shape[0] == 0:
        raise AGPError(f"{source}: no vectors (empty); give at least one row")
    if dim is not None and x.shape[1] != dim:
        raise AGPError(f"{source}: vectors have dimension {x.shape[1]}, the index has {dim}; use vectors of the index's dimension")
    if x.shape[1] < 2:
        raise AGPError(f"{source}: dimension {x.shape[1]} is too small; the index needs dim >= 2")
    # one pass for squared norms finds the NaN/inf rows too (they make the sum non-finite); only
    # those rows are then checked element-wise, instead of an isfinite pass over the whole array
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):   # handled just below
        sq = np.einsum("ij,ij->i", x, x)
    suspect = ~np.isfinite(sq)
    bad = np.zeros(len(x), bool)
    bad[suspect] = ~np.isfinite(x[suspect]).all(axis=1)
    if bad.any():
        r = int(np.argmax(bad))
        raise AGPError(f"{source}: row {first_row + r} contains NaN or inf (or a value beyond float32, ±3.4e38); "
                       f"clean, rescale or drop that row")
    off_scale = suspect | (sq < np.finfo(np.float32).tiny)   # |x|^2 overflows, or |x| below ~1e-19
    if off_scale.any():
        x = _rescale_rows(x, off_scale, source, first_row)
        sq = np.einsum("ij,ij->i", x, x)
    norms = np.sqrt(sq)
    return x / norms[:, None]


def _rescale_rows(x: np.ndarray, rows: np.ndarray, source: str, first_row: int) -> np.ndarray:
    """Rows whose float32 norm overflows (|x| ~ 1e20 and up) or underflows are divided by their
    largest |value| first: the direction is what the index keeps, and without this a huge row
    normalises to all zeros (every search then answers row 0 with score 0)."""
    peak = np.abs(x[rows]).max(axis=1)
    if (peak == 0).any():
        r = int(np.flatnonzero(rows)[int(np.argmax(peak == 0))])
        raise AGPError(f"{source}: row {first_row + r} is all zeros and has no direction; drop that row")
    x = np.array(x, dtype=np.float32)   # a private copy: the source may be a read-only memory map
    x[rows] /= peak[:, None]
    return x


def load_vectors(src, dim: int | None = None) -> np.ndarray:
    """Unit float32 rows [N, d] from an array, `.npy`, `.jsonl`/`.json` path; errors name file and row."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.exists():
            raise AGPError(f"{path}: no such file; give an .npy or .jsonl file of vectors")
        if path.stat().st_size == 0:
            raise AGPError(f"{path}: empty file; give at least one vector")
        if path.suffix == ".npy":
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise AGPError(f"{path}: not a readable .npy array ({e}); save it with numpy.save") from None
            if arr.dtype.kind not in "fiu":
                raise AGPError(f"{path}: dtype {arr.dtype} is not numeric; save float vectors")
            return check_rows(arr, str(path), dim)
        if path.suffix in (".jsonl", ".json", ".ndjson"):
            return check_rows(read_jsonl(path), str(path), dim)
        raise AGPError(f"{path}: unknown vector file type {path.suffix!r}; use .npy or .jsonl")
    return check_rows(src, "array", dim)
