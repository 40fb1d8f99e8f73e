"""Where converted models and other per-machine artifacts live (`AGP_CACHE`, default ~/.cache/agp)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from agp.errors import AGPError


def cache_root() -> Path:
    """The cache directory, created and checked writable."""
    root = Path(os.environ.get("AGP_CACHE") or Path.home() / ".cache" / "agp").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe"):
            pass
    except OSError as e:
        raise AGPError(f"cache directory {root} is not writable ({e.strerror}); "
                       f"set AGP_CACHE to a writable directory") from e
    return root
