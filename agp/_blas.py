"""Make MLX's Linux CPU build use the system OpenBLAS instead of its bundled reference BLAS.

MLX's Linux wheel links a reference BLAS (~6 GFLOP/s on a 1024^3 matmul here). Loading
OpenBLAS with RTLD_GLOBAL *before* `mlx` is imported puts its `sgemm_`/`cblas_*` symbols in
the global lookup scope ahead of the bundled library, so MLX binds to it (measured ~140
GFLOP/s on 2 cores, the same as an LD_PRELOAD set before the interpreter starts). This
avoids re-executing the interpreter. If `mlx` was imported first, nothing can be done and we
say so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform
import sys
import warnings

_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
]


def _find_openblas() -> str | None:
    env = os.environ.get("AGP_OPENBLAS")
    if env:
        return env
    for path in _CANDIDATES + sorted(glob.glob("/usr/lib/*/openblas*/libopenblas.so.0")):
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def _preloaded(name: str) -> bool:
    return name in os.environ.get("LD_PRELOAD", "")


def ensure_fast_blas() -> dict:
    """Load OpenBLAS globally on Linux; return a record of the BLAS MLX will use."""
    if platform.system() == "Darwin":
        return {"blas": "accelerate", "path": None, "how": "macOS (Metal/Accelerate)"}
    if platform.system() != "Linux":
        return {"blas": "unknown", "path": None, "how": platform.system()}
    path = _find_openblas()
    if path and _preloaded("openblas"):
        return {"blas": "openblas", "path": path, "how": "LD_PRELOAD"}
    if path is None:
        warnings.warn(
            "agp: OpenBLAS not found; MLX falls back to its slow reference BLAS (~50x slower "
            "matmuls). Fix: apt-get install libopenblas0-pthread (or set AGP_OPENBLAS=/path/libopenblas.so.0)",
            RuntimeWarning, stacklevel=2)
        return {"blas": "reference", "path": None, "how": "bundled with mlx wheel"}
    if "mlx.core" in sys.modules:
        warnings.warn(
            "agp: mlx was imported before agp, so MLX is bound to its slow reference BLAS. "
            "Fix: import agp before mlx.", RuntimeWarning, stacklevel=2)
        return {"blas": "reference", "path": None, "how": "mlx imported before agp"}
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return {"blas": "openblas", "path": path, "how": "dlopen RTLD_GLOBAL before mlx import"}


def measure_gflops(n: int = 512, reps: int = 5) -> float:
    """Measured fp32 matmul throughput of MLX on this process (recorded in manifests)."""
    import time

    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    dt = (time.perf_counter() - t0) / reps
    return 2 * n**3 / dt / 1e9
