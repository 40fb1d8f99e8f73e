"""Adapter directories (mlx-lm layout) and the check that an adapter belongs to the base model.

An adapter directory holds mlx-lm's `adapter_config.json` + `adapters.safetensors`; AGP adds an
"agp" section to the config (base fingerprint, rank, blocks, data sha256, steps). Loading an
adapter onto a model whose fingerprint differs from the recorded base is refused: its deltas
were fitted to other weights and would silently produce a different model.
"""
from __future__ import annotations

import json
from pathlib import Path

from agp.errors import AGPError

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"


def read_config(adapter: str | Path) -> dict:
    """The adapter's config, or a clear error when the directory is not an adapter."""
    path = Path(adapter) / CONFIG
    if not path.exists():
        raise AGPError(f"adapter directory {adapter} has no {CONFIG}; pass the directory `agp run --stage adapter` wrote")
    if not (Path(adapter) / WEIGHTS).exists():
        raise AGPError(f"adapter directory {adapter} has no {WEIGHTS}; the adapter was not saved completely, retrain it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AGPError(f"corrupt {path}: {e}; retrain the adapter with `agp run --stage adapter`") from e


def check_base(adapter: str | Path, base_fingerprint: str, model_path) -> dict:
    """Refuse an adapter recorded for a different base model; returns its config."""
    cfg = read_config(adapter)
    want = cfg.get("agp", {}).get("base_fingerprint")
    if want and want != base_fingerprint:
        raise AGPError(f"adapter {adapter} was trained on base model {want[:12]} but {model_path} is "
                       f"{base_fingerprint[:12]}; load it with the model it was trained on or retrain it")
    return cfg
