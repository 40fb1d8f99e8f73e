"""The naive fixed split on mx.distributed (`agp.serve.ring`): two ranks under `mlx.launch -n 2
--backend ring` over loopback on a tiny Gemma 3 give plain full-depth greedy decoding's tokens,
for a short prompt and for one far past the 8-token sliding window and across two prefill
chunks; what crosses per token is one boundary state and one token; mistakes are one line.

Every launch has a hard timeout, so a hang fails the test instead of blocking CI."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from agp.backbone import load
from agp.errors import AGPError
from agp.runtime.generator import GenerateArgs, Generator
from agp.serve.ring import PREFILL_STEP, RingSplitArgs, run_ring_split

LAUNCH = Path(sys.executable).with_name("mlx.launch")
pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed beside this Python")
TEXT = "def f(x):\n    return x + 1  # tiny"
# ports apart from test_adapter_distributed.py's 32610-32651 (each launch takes P and P+1)
PORTS = {"short": 32710, "long": 32720, "rank_error": 32730, "timeout": 32740, "stall": 32750}


@pytest.fixture(scope="module")
def long_tiny(long_tiny_dir):
    return long_tiny_dir


def full_tokens(bb, ids, n):
    return [e.token for e in Generator(bb, "full", None, GenerateArgs(max_new_tokens=n)).generate(ids)]


def split(model, ids, b, n, port, timeout=60.0):
    return run_ring_split(RingSplitArgs(model=model, split=b, new_tokens=n, prompt_ids=ids, timeout_s=20),
                          starting_port=port, timeout_s=timeout)


def test_split_equals_full_decoding_and_sends_one_state_per_token(tiny_model_dir):
    model = tiny_model_dir["gemma3_text"]
    bb = load(model)
    ids = bb.encode(TEXT)
    r = split(model, ids, 1, 24, PORTS["short"])   # b=1: rank 0 holds no global-attention layer
    print(f"tiny ring split b=1: {r.tokens_per_s:.1f} tok/s, round trip p50 {r.rtt_ms_p50:.2f} ms "
          f"p99 {r.rtt_ms_p99:.2f} ms")
    assert r.tokens == full_tokens(bb, ids, 24)
    itemsize = bb.model.model.embed_tokens.weight.dtype.size
    assert r.state_bytes_per_token == bb.hidden_size * itemsize and r.token_bytes_per_token == 4
    assert r.prefill_state_bytes == (len(ids) - 1) * bb.hidden_size * itemsize
    assert (r.backend, r.world_size, r.split, r.n_layers, r.prompt_tokens) == ("ring", 2, 1, bb.n_layers, len(ids))
    assert r.tokens_per_s > 0 and 0 < r.rtt_ms_p50 <= r.rtt_ms_p99 and r.prefill_s > 0


def test_split_equals_full_past_the_window_and_across_prefill_chunks(long_tiny):
    bb = load(long_tiny)
    assert bb.config["sliding_window"] < 50
    ids = bb.encode("x = [i * i for i in range(10)]\n" * 70)[:PREFILL_STEP + 60]
    assert len(ids) == PREFILL_STEP + 60   # two chunks on both ranks, far past the window
    r = split(long_tiny, ids, 4, 12, PORTS["long"])
    assert r.tokens == full_tokens(bb, ids, 12)
    assert r.prompt_tokens == len(ids)


@pytest.mark.parametrize("b", [0, -1, 6, 7])
def test_a_split_that_leaves_a_rank_without_layers_is_one_line_before_launch(tiny_model_dir, b):
    t = time.monotonic()
    with pytest.raises(AGPError, match=r"ring split b=-?\d+ leaves a rank without layers; choose 1 <= b <= 5") as e:
        split(tiny_model_dir["gemma3_text"], [2, 40, 41], b, 4, PORTS["short"])
    assert "\n" not in str(e.value) and time.monotonic() - t < 2   # no launch (one costs seconds)


def test_gemma4_is_refused_before_launch(tiny_model_dir):
    with pytest.raises(AGPError, match="supports gemma3_text only"):
        split(tiny_model_dir["gemma4_text"], [2, 40, 41], 2, 4, PORTS["short"])


def test_a_rank_error_comes_back_as_its_one_line(tiny_model_dir, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n")   # rank 0 finds it empty after both joined: rank 1 is waiting on it
    args = RingSplitArgs(model=tiny_model_dir["gemma3_text"], split=2, new_tokens=4, prompt_file=str(blank),
                         timeout_s=20)
    with pytest.raises(AGPError, match="rank 0 of 2: empty prompt") as e:
        run_ring_split(args, starting_port=PORTS["rank_error"], timeout_s=60)
    assert "\n" not in str(e.value)


def test_a_launch_past_its_timeout_is_killed_with_one_line(tiny_model_dir):
    before = {p.pid for p in psutil.process_iter()}
    with pytest.raises(AGPError, match=r"did not finish in 0.5 s \(mlx.launch and both ranks killed\)"):
        split(tiny_model_dir["gemma3_text"], [2, 40, 41], 2, 4, PORTS["timeout"], timeout=0.5)
    time.sleep(0.5)
    left = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
            and "agp.serve.ring" in " ".join(p.info["cmdline"] or [])]
    assert not left, f"ranks left running: {left}"


def rank_process(rank: int, timeout: float = 30) -> psutil.Process:
    """The python process of ring split rank `rank` (its environment says MLX_RANK)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                # the launcher's bash wrapper shares the command line; the rank is the python under it
                if cmd and "python" in Path(cmd[0]).name and "agp.serve.ring" in cmd \
                        and p.environ().get("MLX_RANK") == str(rank):
                    return p
            except psutil.Error:
                continue
        time.sleep(0.05)
    pytest.fail(f"no ring split rank {rank} process")


def connected(p: psutil.Process) -> bool:
    try:
        return any(c.status == psutil.CONN_ESTABLISHED for c in p.net_connections("tcp"))
    except psutil.Error:
        return False


@pytest.mark.parametrize("when", ["joining", "joined"])
def test_a_stalled_rank_ends_the_other_within_its_bound(tiny_model_dir, when):
    """Joining blocks inside MLX holding the GIL: only the watchdog process can bound it. `joined`
    stalls rank 1 after it connected: on a loaded machine that lands in the settings check, the
    prefill or the decode, and each of them is bounded the same way."""
    model = tiny_model_dir["gemma3_text"]
    args = RingSplitArgs(model=model, split=2, new_tokens=400, prompt_ids=load(model).encode(TEXT), timeout_s=3,
                         stop_at_eos=False)
    got = {}

    def launch():
        try:
            run_ring_split(args, starting_port=PORTS["stall"] + (2 if when == "joined" else 0), timeout_s=60)
        except AGPError as e:
            got["error"] = str(e)

    runner = threading.Thread(target=launch)
    runner.start()
    victim, rank0 = rank_process(1), rank_process(0)
    while when == "joined" and not connected(victim) and runner.is_alive():
        time.sleep(0.05)
    time.sleep(1.0 if when == "joined" else 0.0)   # the tiny model loads in well under a second
    victim.send_signal(signal.SIGSTOP)   # whatever phase it is in, rank 0 waits on it from now on
    stopped = time.monotonic()
    try:
        rank0.wait(timeout=30)
    except psutil.TimeoutExpired:
        pass
    finally:
        waited = time.monotonic() - stopped
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()   # a stopped process ignores the launcher's SIGTERM (its own watchdog may be first)
    runner.join(60)
    print(f"stalled while {when}: {got.get('error')}")
    # rank 0 ends on its own bound, or on the lost connection once rank 1's watchdog ended rank 1
    assert "no answer for 3 s after" in got.get("error", "") and "rank 0 of 2: " in got["error"], got
    assert waited < 10, f"rank 0 ended {waited:.0f} s after its peer stalled (bound 3 s)"
