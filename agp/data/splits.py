"""Deterministic train/valid/heldout splits by content hash: the same text always lands in the same split."""
from __future__ import annotations

import hashlib

SPLITS = ("train", "valid", "heldout")
# percent of the hash space per split: 80 / 10 / 10
_BOUNDS = (80, 90)


def content_id(text: str) -> str:
    """Stable id of a text: the first 16 hex chars of its sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def split_of(text: str) -> str:
    """'train', 'valid' or 'heldout' for this text, fixed by its sha256."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < _BOUNDS[0] else "valid" if bucket < _BOUNDS[1] else "heldout"
