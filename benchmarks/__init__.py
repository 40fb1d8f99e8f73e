# asv benchmarks: benchmarks/benchmark_<area>.py; importing agp first gives MLX the fast BLAS.
import agp  # noqa: F401
