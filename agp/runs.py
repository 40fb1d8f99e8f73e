"""Run directories (`runs/<run_id>/`) and their manifests.

A manifest records everything needed to trust and reproduce a run: git commit, platform,
BLAS in use, model/tokenizer fingerprints, dataset sha256s, config, metrics and gate
outcomes per stage, and the exact command. Every update is an atomic rewrite.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

from agp import io
from agp.errors import AGPError

MANIFEST = "manifest.json"


def runs_root(root: str | os.PathLike | None = None) -> Path:
    """The directory holding runs (`AGP_RUNS` or ./runs)."""
    return Path(root or os.environ.get("AGP_RUNS", "runs"))


def git_commit() -> str | None:
    """HEAD of the checkout holding this package, '+dirty' when it has changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def platform_info() -> dict:
    """Machine facts recorded in every manifest."""
    import psutil

    from agp import BLAS
    return {
        "system": platform.system(), "machine": platform.machine(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "blas": BLAS,
    }


def _read_manifest(mpath: Path) -> dict:
    """A run manifest that is a JSON object with a string run_id and a stages object, or a one-line error."""
    fix = "delete the run directory (or pass another --run-dir) and rerun `agp run`"
    if not mpath.is_file():
        raise AGPError(f"{mpath} is not a file; {fix}")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AGPError(f"corrupt manifest {mpath} ({type(e).__name__}: not UTF-8 JSON); {fix}") from None
    if not isinstance(manifest, dict):
        raise AGPError(f"corrupt manifest {mpath}: expected a JSON object, got {type(manifest).__name__}; {fix}")
    if not isinstance(manifest.get("run_id"), str) or not manifest["run_id"]:
        raise AGPError(f"corrupt manifest {mpath}: no run_id; {fix}")
    if not isinstance(manifest.setdefault("stages", {}), dict) or \
            not all(isinstance(rec, dict) for rec in manifest["stages"].values()):
        raise AGPError(f"corrupt manifest {mpath}: 'stages' is not an object of stage records; {fix}")
    if not isinstance(manifest.get("config", {}), dict):
        raise AGPError(f"corrupt manifest {mpath}: 'config' is not an object; {fix}")
    return manifest


class Run:
    """One run directory with its manifest."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise AGPError(f"no run at {self.path} (missing {MANIFEST}); create one with `agp run`")
        self.manifest = _read_manifest(mpath)

    @property
    def id(self) -> str:
        return self.manifest["run_id"]

    def stage_dir(self, stage: str) -> Path:
        d = self.path / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def stage(self, stage: str) -> dict:
        """The manifest section of a stage ({} if it has not run)."""
        return self.manifest.get("stages", {}).get(stage, {})

    def require(self, stage: str, needed_by: str) -> dict:
        """The record of a finished stage, or a clear error naming what is missing."""
        rec = self.stage(stage)
        if rec.get("status") != "done":
            raise AGPError(f"run {self.path} has no finished '{stage}' stage, which '{needed_by}' needs; "
                           f"run `agp run --stage {stage}` first")
        return rec

    def relative(self, path) -> str:
        """`path` as recorded in the manifest: relative to the run directory, so a copied or moved
        run (or one read from another working directory) still finds its files."""
        try:
            return str(Path(path).resolve().relative_to(self.path.resolve()))
        except ValueError:
            return str(Path(path).resolve())

    def artifact(self, stage: str, key: str) -> Path | None:
        """The file or folder a stage recorded under `artifacts[key]`, resolved against this run.

        Older manifests hold paths relative to the working directory of the run that wrote them;
        their part after `<run_id>/` is taken as relative to the run, so copies keep working."""
        recorded = (self.stage(stage).get("artifacts") or {}).get(key)
        if not recorded:
            return None
        path = Path(recorded)
        if not path.is_absolute():
            marker = f"{self.id}/"
            return self.path / (recorded.split(marker, 1)[1] if marker in recorded else recorded)
        return path

    def update_stage(self, stage: str, **fields) -> None:
        """Merge fields into a stage's manifest record and rewrite the manifest atomically."""
        self.manifest.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        self.save()

    def save(self) -> None:
        io.write_json(self.path / MANIFEST, self.manifest)


def new_run(root=None, argv: list[str] | None = None, config: dict | None = None) -> Run:
    """Create `runs/<run_id>/` with an initial manifest and point `runs/latest` at it."""
    root = runs_root(root)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_id = f"{stamp}-{uuid.uuid4().hex[:6]}"
    path = root / run_id
    path.mkdir(parents=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    manifest = {
        "run_id": run_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "platform": platform_info(),
        "config": config or {},
        "reproduce": "agp " + " ".join(shlex.quote(a) for a in argv),
        "stages": {},
    }
    io.write_json(path / MANIFEST, manifest)
    set_latest(root, path)
    return Run(path)


def set_latest(root: Path, path: Path) -> None:
    """Atomically repoint `root/latest` at `path`."""
    link = root / "latest"
    tmp = root / f".latest.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(path.name)
    os.replace(tmp, link)


def latest_or_none(root=None) -> Run | None:
    """The newest run, or None when there is none yet."""
    link = runs_root(root) / "latest"
    return Run(link.resolve()) if link.exists() else None


def latest_run(root=None) -> Run:
    """The newest run, or a clear error."""
    link = runs_root(root) / "latest"
    if not link.exists():
        raise AGPError(f"no runs under {runs_root(root)}; start one with `agp run`")
    return Run(link.resolve())
