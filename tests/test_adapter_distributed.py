"""Stage 1 across ranks: `mlx.launch -n 2 --backend ring` over loopback on a tiny model equals the
single-host run; a rank that dies or stalls ends the run with one line and the rerun resumes.

Every subprocess has a timeout, so a hang fails the test instead of blocking CI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
ADAPTER = ["--no-gates", "--adapter-blocks", "2", "--adapter-max-seq", "96", "--adapter-eval-rows", "2",
           "--adapter-control-rows", "1", "--adapter-lens-rows", "1", "--adapter-lr", "1e-3"]
# measured: 2 ranks vs 1 rank differ by < 1e-6 in weights and < 1e-7 in held-out NLL (reduction order)
NLL_TOL = 1e-5
WEIGHT_TOL = 1e-4
pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed beside this Python")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    return {**env, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _restore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # CI runs in a background job: SIGINT inherited ignored


def agp(run_dir, model, *flags, ranks: int = 1, port: int = 0, timeout: float = 240) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "agp.cli", "run", "--stage", "adapter", "--run-dir", str(run_dir),
           "--model", model, *ADAPTER, *flags]
    if ranks > 1:
        cmd = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "--hosts", "127.0.0.1",
               "--starting-port", str(port), "--", *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_restore_sigint)
    proc.deadline = time.monotonic() + timeout
    return proc


def finish(proc) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=max(1.0, proc.deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"timed out:\n{out[-3000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def baseline_run(tiny_model_dir, tmp_path_factory):
    from agp.cli import main
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", "--stage", "baseline", "--runs", str(root), "--model", tiny_model_dir["gemma3_text"],
                 "--no-gates", "--baseline-prompts", "1", "--baseline-decode-tokens", "2"]) == 0
    return (root / "latest").resolve()


def copy_run(baseline_run, tmp_path, name) -> Path:
    dest = tmp_path / name
    shutil.copytree(baseline_run, dest)
    return dest


def error_lines(out: str, rank: int) -> list[str]:
    """Rank `rank`'s one-line errors (a progress bar may precede one on the same line)."""
    tag = f"agp: error: rank {rank} of 2"
    return [ln[ln.index(tag):] for ln in out.splitlines() if tag in ln]


def adapter_of(run_dir: Path, out: str = "") -> tuple[dict, dict]:
    import mlx.core as mx
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["stages"]["adapter"].get("status") == "done", out[-3000:]
    weights = {k: np.asarray(v) for k, v in mx.load(str(run_dir / "adapter/adapter/adapters.safetensors")).items()}
    return man["stages"]["adapter"], weights


def weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_two_ranks_equal_one(baseline_run, tiny_model_dir, tmp_path):
    model = tiny_model_dir["gemma3_text"]
    one, two = copy_run(baseline_run, tmp_path, "one"), copy_run(baseline_run, tmp_path, "two")
    steps = ["--adapter-iters", "4", "--adapter-batch", "4"]
    p1, p2 = agp(one, model, *steps), agp(two, model, *steps, ranks=2, port=32610)
    (rc1, out1), (_, out2) = finish(p1), finish(p2)   # mlx.launch exits 0 whatever its ranks did
    assert rc1 == 0, out1[-3000:]
    assert "rank 1 of 2: trained steps 1-4" in out2
    (rec1, w1), (rec2, w2) = adapter_of(one, out1), adapter_of(two, out2)
    d = rec2["metrics"]["train"]["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "ring" and [r["rank"] for r in d["ranks"]] == [0, 1]
    assert all(r["tokens"] > 0 and r["tokens_per_second"] > 0 for r in d["ranks"])
    # the two ranks split the global batch: their tokens add up to the single-host run's
    single = rec1["metrics"]["train"]["distributed"]
    assert single["world_size"] == 1 and sum(r["tokens"] for r in d["ranks"]) == single["ranks"][0]["tokens"]
    assert d["allreduce_bytes_per_step"] == 4 * rec2["metrics"]["adapter"]["trainable_params"]
    nll1, nll2 = (r["metrics"]["eval"]["heldout"]["tuned_nll"] for r in (rec1, rec2))
    print(f"held-out NLL 1 rank {nll1!r}, 2 ranks {nll2!r}; max weight diff {weight_diff(w1, w2):.3g}")
    assert abs(nll1 - nll2) < NLL_TOL and weight_diff(w1, w2) < WEIGHT_TOL
    assert rec1["metrics"]["eval"]["heldout"]["base_nll"] == rec2["metrics"]["eval"]["heldout"]["base_nll"]
    assert not list(two.glob("adapter/.trainer.*")), "scratch folders are removed"


def rank_process(launcher, rank: int, timeout: float = 60) -> psutil.Process:
    """The python process of `rank` under an mlx.launch (its environment says MLX_RANK)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("MLX_RANK") == str(rank) and "python" in child.name():
                    return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    pytest.fail(f"no rank {rank} process under the launcher")


def wait_checkpoint(run_dir: Path, step: int, proc, timeout: float = 120) -> int:
    state = run_dir / "adapter/checkpoints/state.json"
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if state.exists():
            got = json.loads(state.read_text())["step"]
            if got >= step:
                return got
        time.sleep(0.02)
    pytest.fail(f"no checkpoint at step {step} while training ran")


LONG = ["--adapter-iters", "40", "--adapter-batch", "2", "--adapter-checkpoint-every", "2"]


def test_killed_rank_ends_the_run_and_the_rerun_resumes(baseline_run, tiny_model_dir, tmp_path):
    model = tiny_model_dir["gemma3_text"]
    cut = copy_run(baseline_run, tmp_path, "cut")
    launcher = agp(cut, model, *LONG, ranks=2, port=32620)
    victim = rank_process(launcher, 1)
    wait_checkpoint(cut, 4, launcher)
    victim.send_signal(signal.SIGSTOP)   # freeze it first: training can not run past the kill point
    victim.kill()
    _, out = finish(launcher)   # mlx.launch exits 0 whatever its ranks did: read their lines and the manifest
    assert json.loads((cut / "manifest.json").read_text())["stages"]["adapter"]["status"] != "done"
    lines = error_lines(out, 0)
    assert len(lines) == 1 and "rerun the same command to resume" in lines[0], out[-3000:]
    state = json.loads((cut / "adapter/checkpoints/state.json").read_text())
    assert 4 <= state["step"] < 40
    _, out = finish(agp(cut, model, *LONG, ranks=2, port=32630))
    rec, w_cut = adapter_of(cut, out)
    assert rec["metrics"]["train"]["resumed_from"] == state["step"]
    assert np.isfinite(rec["metrics"]["train"]["loss_last"]) and rec["metrics"]["train"]["steps"] == 40
    assert all(np.isfinite(v).all() for v in w_cut.values())


def test_stalled_rank_ends_the_run_within_the_peer_timeout(baseline_run, tiny_model_dir, tmp_path):
    model = tiny_model_dir["gemma3_text"]
    run = copy_run(baseline_run, tmp_path, "stall")
    launcher = agp(run, model, *LONG, "--adapter-peer-timeout", "8", ranks=2, port=32640)
    victim, rank0 = rank_process(launcher, 1), rank_process(launcher, 0)
    wait_checkpoint(run, 2, launcher)
    victim.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        rank0.wait(timeout=60)
    except psutil.TimeoutExpired:
        pass
    finally:
        waited = time.monotonic() - stopped
        victim.kill()   # the launcher can not end a stopped process; the test does
    _, out = finish(launcher)
    lines = error_lines(out, 0)
    assert len(lines) == 1 and "no answer from the peer ranks for 8 s" in lines[0], out[-3000:]
    assert waited < 30, f"rank 0 ended {waited:.0f} s after its peer stalled (bound 8 s)"


def test_only_the_adapter_stage_runs_across_ranks(baseline_run, tiny_model_dir, tmp_path):
    run = copy_run(baseline_run, tmp_path, "other")
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--hosts", "127.0.0.1", "--starting-port", "32650", "--",
           sys.executable, "-m", "agp.cli", "run", "--stage", "baseline", "--run-dir", str(run), "--no-gates"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=_restore_sigint)
    assert "only `agp run --stage adapter` runs across ranks" in proc.stderr + proc.stdout
