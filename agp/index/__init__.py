"""TurboQuant retrieval index: build, `.tqidx` snapshot (mmap), fast scan over packed codes, exact rerank."""
from agp.index.tqindex import IndexArgs, TQIndex  # noqa: F401
