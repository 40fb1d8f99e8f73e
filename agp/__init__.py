"""AGP: a conditional-compute fabric over MLX decoder transformers.

Importing `agp` first makes MLX use a fast BLAS on Linux (see `agp._blas`); import `agp`
before `mlx` for that to take effect.
"""
from agp import _blas

BLAS = _blas.ensure_fast_blas()
__version__ = "0.1.0"
