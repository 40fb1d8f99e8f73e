"""`agp generate`: streams text and one summary line; bad input is a one-line error (exit 2)."""
from __future__ import annotations

import json

import pytest

from agp.cli import main


@pytest.fixture
def tiny(tiny_model_dir):
    return tiny_model_dir["gemma3_text"]


def test_generate_streams_and_summarises(tiny, capsys, tmp_path):
    assert main(["generate", "def f(x):", "--model", tiny, "--max-new-tokens", "5", "--run", str(tmp_path / "none")]) == 2
    assert "no run" in capsys.readouterr().err
    assert main(["generate", "def f(x):", "--model", tiny, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.err.strip().startswith("[full] 5 tokens") and "MACs/token" in out.err
    assert out.err.count("\n") == 1


def test_generate_json_and_file(tiny, capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("print(1)")
    assert main(["generate", f"@{f}", "--model", tiny, "--max-new-tokens", "3", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and lines[-1]["summary"]["tokens"] == 3
    assert all(x["action"] == "full" for x in lines[:3])


@pytest.mark.parametrize("argv,msg", [
    (["   "], "empty prompt"),
    (["x", "--max-new-tokens", "0"], "max-new-tokens"),
    (["x", "--max-new-tokens", "-3"], "max-new-tokens"),
    (["x" * 600], "limit"),
    (["x", "--mode", "fast"], "unknown mode"),
    (["x", "--mode", "speculative"], "runtime"),
])
def test_generate_bad_input_is_one_line(tiny, capsys, tmp_path, monkeypatch, argv, msg):
    monkeypatch.setenv("AGP_RUNS", str(tmp_path))
    assert main(["generate", *argv, "--model", tiny]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agp: error:") and msg in err and err.count("\n") == 1
