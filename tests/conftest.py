"""Shared fixtures: tiny random models of each supported architecture (built once per session)."""
from __future__ import annotations

import pytest

from tests.tiny import make_tiny_model

ARCHS = ["gemma3_text", "gemma4_text"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """arch -> path of a tiny random mlx-lm model directory."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: str(make_tiny_model(arch, root / arch)) for arch in ARCHS}
