"""Outputs never destroy what AGP did not write (issue 13, data loss): each test plants the user's
files in a temporary directory, runs the command in-process, and checks they are all still there."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from agp.cli import main
from agp.data.build import DataArgs, build

FX = Path(__file__).resolve().parents[1] / "fixtures" / "transcripts"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _source(tmp_path: Path) -> Path:
    """A private copy of the fixture transcripts (so a test may try to build over it)."""
    src = tmp_path / "src"
    src.mkdir()
    for f in FX.glob("*.jsonl"):
        (src / f.name).write_bytes(f.read_bytes())
    return src


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("agp: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_unrelated_directory_is_refused_then_replaced_with_force(tmp_path, capsys):
    """Before: `--out DIR` on a directory of someone's files emptied it silently.
    After: refused (exit 2, one line naming --force); with --force it is replaced by the lanes."""
    src, out = _source(tmp_path), tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = _tree(out)
    assert main(["data", "build", "--source", str(src), "--out", str(out)]) == 2
    _one_line_error(capsys, "not an `agp data build` output", "--force")
    assert _tree(out) == before
    assert main(["data", "build", "--source", str(src), "--out", str(out), "--force"]) == 0
    assert (out / "manifest.json").exists() and not (out / "holiday.jpg").exists()


def test_earlier_build_and_empty_directory_are_replaced_without_force(tmp_path):
    """An earlier `agp data build` output (recognised by its manifest) and an empty directory hold
    nothing AGP did not write: rebuilding there needs no flag (as before)."""
    src, out, empty = _source(tmp_path), tmp_path / "lanes", tmp_path / "empty"
    build(DataArgs(source=str(src)), out)
    build(DataArgs(source=str(src)), out)
    empty.mkdir()
    assert build(DataArgs(source=str(src)), empty)["kept"] > 0


@pytest.mark.parametrize("target", ["source", "parent", "cwd"])
def test_source_its_parent_and_cwd_are_never_replaced_even_with_force(tmp_path, monkeypatch, capsys, target):
    """Before: `--out` equal to the source, a parent of the source, or `.` emptied that directory.
    After: refused with one line even with --force; every file is still there."""
    work = tmp_path / "work"
    work.mkdir()
    src = _source(work)
    monkeypatch.chdir(work)
    out = {"source": str(src), "parent": str(work), "cwd": "."}[target]
    before = _tree(work)
    assert main(["data", "build", "--source", str(src), "--out", out, "--force"]) == 2
    _one_line_error(capsys, "choose a new directory")
    assert _tree(work) == before


def test_empty_out_is_refused(tmp_path, monkeypatch, capsys):
    """Before: `--out ''` tried to rename the current directory away. After: one-line error."""
    src = _source(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    assert main(["data", "build", "--source", str(src), "--out", ""]) == 2
    _one_line_error(capsys, "--out is empty")
    assert _tree(tmp_path) == before


def test_regular_file_out_is_never_renamed_away(tmp_path, capsys):
    """Before: `--out notes.txt` hid the file as `.notes.txt.old.PID` and put a directory there.
    After: refused with and without --force; the file is untouched and nothing hidden appears."""
    src, out = _source(tmp_path), tmp_path / "notes.txt"
    out.write_text("my notes\n")
    for extra in ([], ["--force"]):
        assert main(["data", "build", "--source", str(src), "--out", str(out), *extra]) == 2
        _one_line_error(capsys, "is an existing file")
    assert out.read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "src"]


def _vectors(path: Path, n: int = 40, dim: int = 16) -> Path:
    np.save(path, np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32))
    return path


def test_index_build_onto_its_input_is_refused(tmp_path, capsys):
    """Before: `agp index build X.npy X.npy` overwrote the vectors with the snapshot, exit 0.
    After: refused (exit 2, one line); the .npy is byte-identical."""
    x = _vectors(tmp_path / "x.npy")
    before = x.read_bytes()
    assert main(["index", "build", str(x), str(x)]) == 2
    _one_line_error(capsys, "is also the input")
    assert x.read_bytes() == before
    link = tmp_path / "alias.npy"
    link.symlink_to(x)
    assert main(["index", "build", str(x), str(link)]) == 2
    _one_line_error(capsys, "is also the input")
    assert x.read_bytes() == before


def test_index_build_over_a_foreign_file_needs_force(tmp_path, capsys):
    """An existing OUT that is not a .tqidx is refused without --force (before: overwritten)."""
    x, out = _vectors(tmp_path / "x.npy"), tmp_path / "thesis.tex"
    out.write_text("\\documentclass{article}\n")
    assert main(["index", "build", str(x), str(out)]) == 2
    _one_line_error(capsys, "not a .tqidx snapshot", "--force")
    assert out.read_text().startswith("\\documentclass")
    assert main(["index", "build", str(x), str(out), "--force"]) == 0


def test_index_append_writes_through_a_symlink_and_keeps_the_mode(tmp_path, capsys):
    """Before: appending through `link.tqidx` replaced the link by a new file (the real snapshot
    kept its old rows) and every append turned mode 0644 into 0600.
    After: the link stays a link, the real file holds the new rows, and its mode is unchanged."""
    real, link = tmp_path / "real.tqidx", tmp_path / "link.tqidx"
    assert main(["index", "build", str(_vectors(tmp_path / "a.npy")), str(real)]) == 0
    os.chmod(real, 0o644)
    link.symlink_to(real)
    more = _vectors(tmp_path / "b.npy", n=8)
    capsys.readouterr()
    assert main(["index", "append", str(link), str(more)]) == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert stat.S_IMODE(real.stat().st_mode) == 0o644
    from agp.index import TQIndex
    assert len(TQIndex.open(real)) == 48
