"""Root pytest config: make `import agp` (fast BLAS) happen before any test imports mlx."""
import agp  # noqa: F401
