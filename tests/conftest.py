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


@pytest.fixture(scope="session")
def long_tiny_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Gemma 3 with a 4096-token context, so prompts run far past its 8-token window (and
    across two 2048-token prefill chunks)."""
    import json
    import shutil
    dest = tmp_path_factory.mktemp("tiny-long") / "gemma3_text"
    shutil.copytree(tiny_model_dir["gemma3_text"], dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (dest / "config.json").write_text(json.dumps(cfg))
    return str(dest)


# The tiny-model flags that keep each stage a few seconds long (integration tests through the CLI).
TINY_STAGE_FLAGS = {
    "baseline": ["--baseline-prompts", "2", "--baseline-decode-tokens", "2"],
    "controller": ["--controller-prompts", "16", "--controller-steps", "40"],
    "runtime": ["--runtime-exit-layers", "2,3", "--runtime-prompts", "6", "--runtime-bench-prompts", "1",
                "--runtime-new-tokens", "6", "--runtime-long-prompt-tokens", "300", "--runtime-head-steps", "5",
                "--runtime-vocabs", "128"],
    "depth": ["--depth-prompts", "6", "--depth-heldout-prompts", "3", "--depth-module-steps", "20"],
    "transfer": ["--transfer-prompts", "3", "--transfer-heldout-prompts", "2", "--transfer-max-tokens", "24",
                 "--transfer-continuation", "3", "--transfer-codecs", "f32,fp16,q8_0,tq4",
                 "--transfer-long-prompt-tokens", "60", "--transfer-pool-prompts", "6",
                 "--transfer-adapter-widths", "8,40/tq3", "--transfer-adapter-modes", "hidden,fisher,logit", "--transfer-adapter-steps", "10",
                 "--transfer-adapter-logit-steps", "3", "--transfer-adapter-logit-positions", "4"],
    "serve": ["--serve-prompts", "1", "--serve-new-tokens", "6", "--serve-long-prompt-tokens", "40",
              "--serve-rtts-ms", "0,2", "--serve-clients", "3", "--serve-requests", "12", "--serve-short-sessions", "20",
              "--serve-pings", "20"],
}


def run_tiny_stages(root, model: str, stages, extra: dict | None = None):
    """Run `stages` in order through `agp run --stage` on a tiny model under `root`; `extra` maps a
    stage to flags appended to (and so overriding) its tiny defaults. Returns the run."""
    from agp.cli import main
    from agp.runs import Run
    for stage in stages:
        flags = TINY_STAGE_FLAGS.get(stage, []) + (extra or {}).get(stage, [])
        assert main(["run", "--stage", stage, "--runs", str(root), "--model", model, "--no-gates", *flags]) == 0, stage
    return Run((root / "latest").resolve())
