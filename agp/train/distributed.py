"""Data-parallel adapter training across processes or hosts, on MLX's own distributed engine.

Nothing here is a second communication layer: the group is `mx.distributed.init()` (ring over
TCP, JACCL over Thunderbolt 5, MPI or NCCL, whichever `mlx.launch` set up), mlx-lm's trainer
splits each global batch across the ranks and averages the gradients (`average_gradients`), and
this module adds only what a run that must equal the single-host one, and must never hang, needs:
  - `World`: rank, size and backend of the launch (size 1 without a launcher);
  - `token_weighted`: the loss rescaled so the averaged gradient is the single-host one (the
    mean over every scored token of the global batch, not the mean of per-rank means);
  - `agree`: every rank checks it holds the same settings, data and model (one all_gather);
  - `broadcast`: rank 0's arrays to every rank (the resumed checkpoint, the fresh adapter);
  - `PeerWatch`: a bounded wait on peers; a collective that does not return in time ends the
    process with one line, and SIGTERM from the launcher (a peer died) becomes one line too;
  - `clean_env`: the environment without the launcher's variables, for subprocesses (gates).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

from agp.errors import AGPError

# What `mlx.launch` exports per backend (mlx/_distributed_utils/launch.py); a subprocess that
# inherits them would try to join the group.
LAUNCH_VARS = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_RING_VERBOSE", "MLX_JACCL_COORDINATOR",
               "MLX_JACCL_RING", "MLX_IBV_DEVICES", "NCCL_HOST_IP", "NCCL_PORT")
LAUNCH_PREFIXES = ("OMPI_", "PMI_", "PMIX_")
RESUME_HINT = "rerun the same command to resume every rank from the last checkpoint"


@dataclass(frozen=True)
class World:
    group: object | None   # mx.distributed.Group; None when single-host
    rank: int
    size: int
    backend: str | None    # ring | jaccl | mpi | nccl; None when single-host

    @property
    def writer(self) -> bool:
        """Only rank 0 writes (checkpoints, adapter, manifest, report)."""
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def to_dict(self) -> dict:
        return {"world_size": self.size, "backend": self.backend}


def backend_from_env(env=os.environ) -> str | None:
    if env.get("MLX_JACCL_COORDINATOR") or env.get("MLX_IBV_DEVICES"):
        return "jaccl"
    if env.get("MLX_HOSTFILE"):
        return "ring"
    if env.get("NCCL_HOST_IP"):
        return "nccl"
    if any(k.startswith(LAUNCH_PREFIXES) for k in env):
        return "mpi"
    return None


@lru_cache(maxsize=1)
def world() -> World:
    """The launch this process is part of. Joining blocks until every rank is up (MLX's rule)."""
    if backend_from_env() is None:
        return World(None, 0, 1, None)
    try:
        group = mx.distributed.init()
    except RuntimeError as e:
        raise AGPError(f"could not join the distributed group ({e}); start every rank with the same "
                       f"`mlx.launch` command (docs/adapter.md 'Across hosts')") from None
    if group.size() == 1:
        return World(None, 0, 1, None)
    return World(group, group.rank(), group.size(), backend_from_env())


def clean_env(env=os.environ) -> dict:
    """`env` without the launcher's variables: a subprocess started from a rank stays single-host."""
    return {k: v for k, v in env.items() if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}


def token_weighted(loss, w: World):
    """Wrap an mlx-lm loss `(model, batch, lengths) -> (mean over the rank's tokens, tokens)` so
    that averaging the ranks' gradients gives the gradient of the mean over the global batch's
    tokens: each rank's mean is scaled by size * its tokens / all tokens."""
    if w.size == 1:
        return loss

    def weighted(model, batch, lengths):
        mean, ntoks = loss(model, batch, lengths)
        total = mx.distributed.all_sum(ntoks, group=w.group, stream=mx.cpu)
        return mean * (w.size * ntoks.astype(mx.float32) / total.astype(mx.float32)), ntoks
    return weighted


def _gather_rows(w: World, row: np.ndarray) -> np.ndarray:
    """One float32 row per rank, [size, len(row)], in rank order."""
    got = mx.distributed.all_gather(mx.array(row.astype(np.float32))[None], group=w.group, stream=mx.cpu)
    return np.asarray(got)


def agree(w: World, what: dict) -> None:
    """Every rank holds the same `what` (settings, data and model identity), or a one-line error
    on every rank naming the ranks that differ."""
    if w.size == 1:
        return
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).digest()
    rows = _gather_rows(w, np.frombuffer(digest, dtype=np.uint8))
    differ = [r for r in range(w.size) if not np.array_equal(rows[r], rows[0])]
    if differ:
        raise AGPError(f"{w.label}: ranks {differ} do not hold rank 0's settings, training data or base model "
                       f"(compared: {', '.join(sorted(what))}); start every rank with the same flags, --model "
                       f"and --adapter-source data")


def broadcast(w: World, arrays: dict) -> dict:
    """rank 0's arrays on every rank (an all_sum to which the other ranks add zeros: exact).
    Every rank passes arrays of the same names, shapes and dtypes; they are sent in name order,
    since the ranks' dicts may be ordered differently (a restored state comes back sorted)."""
    if w.size == 1:
        return arrays
    out = {k: mx.distributed.all_sum(arrays[k] if w.rank == 0 else mx.zeros_like(arrays[k]), group=w.group,
                                     stream=mx.cpu) for k in sorted(arrays)}
    mx.eval(out)
    return out


def broadcast_int(w: World, value: int) -> int:
    if w.size == 1:
        return value
    return int(broadcast(w, {"v": mx.array(value if w.rank == 0 else 0, dtype=mx.int32)})["v"].item())


def gather_floats(w: World, values: list[float]) -> list[list[float]]:
    """Each rank's `values`, in rank order (a few figures per rank: throughput)."""
    if w.size == 1:
        return [list(values)]
    return _gather_rows(w, np.asarray(values, dtype=np.float32)).tolist()


class PeerLost(AGPError):
    """A peer rank died or stopped answering: this rank ends with one line."""


class PeerWatch:
    """Bounded waits on peer ranks. `kick(phase)` after every step that completed a collective;
    when `timeout` seconds pass without a kick, the process prints one line and exits (a thread
    can not interrupt a collective blocked in MLX, so exiting is the only bounded way out).
    While active, SIGTERM (what `mlx.launch` sends the other ranks when one fails) raises
    PeerLost in the main thread instead of killing the process silently."""

    EXIT = 75   # EX_TEMPFAIL: rerunning is the fix

    def __init__(self, w: World, timeout: float, hint: str = RESUME_HINT):
        self.w, self.timeout, self.hint = w, float(timeout), hint
        self.phase, self.deadline = "starting", time.monotonic() + self.timeout
        self._stop = threading.Event()
        self._thread = None
        self._old_term = None

    def __enter__(self):
        if self.w.size == 1:
            return self
        self._thread = threading.Thread(target=self._watch, name="agp-peer-watch", daemon=True)
        self._thread.start()
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, exc_type, *exc):
        self._stop.set()
        if self._old_term is not None:
            # a rank leaving with an error is ending anyway: the launcher's SIGTERM (sent as soon as a
            # peer exits) must not kill it before its one line is printed (seen on a quiet machine)
            ending = exc_type is not None and issubclass(exc_type, Exception)
            signal.signal(signal.SIGTERM, signal.SIG_IGN if ending else self._old_term)
        return False

    def kick(self, phase: str) -> None:
        self.phase, self.deadline = phase, time.monotonic() + self.timeout

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() > self.deadline:
                sys.stderr.write(f"agp: error: {self.w.label}: no answer from the peer ranks for {self.timeout:g} s "
                                 f"after {self.phase} (a peer died or stalled; the bound is --adapter-peer-timeout); "
                                 f"{self.hint}\n")
                sys.stderr.flush()
                os._exit(self.EXIT)

    def _on_term(self, signum, frame):
        raise PeerLost(f"{self.w.label}: stopped by the launcher after {self.phase} (another rank ended); {self.hint}")


def is_peer_error(err: Exception) -> bool:
    """MLX's backends prefix their errors with their name ("[ring] connection to a peer was lost")."""
    return str(err).startswith(("[ring]", "[jaccl]", "[mpi]", "[nccl]"))


def lost(w: World, phase: str, err: Exception) -> PeerLost:
    """The one-line error for a collective that failed because a peer went away."""
    return PeerLost(f"{w.label}: lost the connection to a peer rank after {phase} ({err}); {RESUME_HINT}")
