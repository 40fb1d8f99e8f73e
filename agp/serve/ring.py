"""The naive fixed split on `mx.distributed`: the baseline for running one model on two hosts.

Layout (`mlx.launch -n 2`, ring over TCP or JACCL over Thunderbolt; loopback in the tests):
  - rank 0 owns the embedding and layers [0, b): it holds the prompt, prefills its layers and
    embeds every pending token;
  - rank 1 owns layers [b, L), the final norm and the LM head: it takes the greedy token.
Each rank keeps the KV cache of its own layers only; nothing about the cache crosses.

The wire, in order (every message is an `mx.distributed.send`/`recv` of an agreed shape and dtype):
  - once: a digest of the settings and the model from each rank (`all_gather`), so both hold the
    same split, model and boundary dtype before anything else is sent;
  - prefill: the prompt length (int32 [1]), then per mlx-lm chunk of 2048 the boundary states
    [1, n, H]; rank 1 acknowledges the end of its prefill (int32 [1]) so prefill is timed apart;
  - per token: the boundary state [1, 1, H] rank 0 -> rank 1 (H x the state's itemsize bytes),
    the greedy token int32 [1] rank 1 -> rank 0 (4 bytes). Both ranks see every token, so both
    stop at EOS or at the token budget without another message.

Why it is the baseline: no routing and no speculation, so every token pays exactly one crossing
each way plus both halves' compute in series (the ranks never work at the same time); whatever a
smarter split does is measured against this. The tokens equal plain full-depth greedy decoding
(`agp.runtime.full`) because the layers, caches, chunking and argmax are the same, only placed on
two processes.

Gemma 3 only: rank 1 runs its layers from the state alone (masks from its own caches); Gemma 4
shares K/V from earlier layers and needs the tokens, which this baseline does not send.

Run it with `run_ring_split(RingSplitArgs(...))`; each rank runs
`python -m agp.serve.ring --json-args FILE --out FILE` under `mlx.launch`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import numpy as np

from agp import io
from agp.errors import AGPError

PREFILL_STEP = 2048   # mlx-lm's prefill chunk (agp.runtime.full.PREFILL_STEP)
TOKEN_DTYPE = mx.int32
# What `mlx.launch` exports (agp.train.distributed.LAUNCH_VARS, which this layer may not import):
# a subprocess that inherits them would try to join a group.
LAUNCH_PREFIXES = ("MLX_", "OMPI_", "PMI_", "PMIX_")
LAUNCH_VARS = ("NCCL_HOST_IP", "NCCL_PORT")
SPLIT_ARCHS = ("gemma3_text",)


@dataclass
class RingSplitArgs:
    model: str | None = None          # mlx-lm directory; None = the embedded Gemma 3 270M
    adapter: str | None = None        # a LoRA adapter directory both ranks load over the model (a run's)
    split: int = 6                    # b: rank 0 runs layers [0, b), rank 1 runs [b, L) and the head
    new_tokens: int = 32
    prompt_ids: list[int] | None = None   # token ids (BOS included), or
    prompt_file: str | None = None        # a text file, encoded with the model's tokenizer
    timeout_s: float = 60.0           # the bound on any one wait for the peer rank
    stop_at_eos: bool = True          # like GenerateArgs: EOS ends decoding and is not emitted

    @classmethod
    def from_dict(cls, d: dict) -> "RingSplitArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AGPError(f"ring split arguments {unknown} are not known; use {sorted(known)}")
        return cls(**d)


@dataclass
class RingResult:
    tokens: list[int]
    tokens_per_s: float               # decode only: emitted tokens / decode seconds
    prefill_s: float
    decode_s: float
    rtt_ms_p50: float                 # per token: rank 0 embeds + runs [0, b), sends, gets the token
    rtt_ms_p99: float
    rank0_ms_p50: float               # rank 0's own share of a step; the rest is the wire and rank 1
    state_bytes_per_token: int        # rank 0 -> rank 1: H x the state's itemsize
    token_bytes_per_token: int        # rank 1 -> rank 0
    prefill_state_bytes: int         # rank 0 -> rank 1 during prefill: (prompt - 1) x H x itemsize
    backend: str
    world_size: int
    split: int
    n_layers: int
    hidden_size: int
    state_dtype: str
    prompt_tokens: int
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "RingResult":
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: d[k] for k in known}, extra={k: v for k, v in d.items() if k not in known})


# --- checks before any launch --------------------------------------------------------------
def model_dir(model: str | None) -> Path:
    """The model directory both ranks load (the embedded default is converted here, once)."""
    if model is None:
        from agp.backbone import embedded
        return embedded.model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise AGPError(f"ring split model {model} is not an mlx-lm model directory (no config.json); "
                       f"give a converted model directory or None for the embedded default")
    return path.resolve()


def check_split(split: int, n_layers: int, arch: str) -> None:
    if arch not in SPLIT_ARCHS:
        raise AGPError(f"the ring split supports {', '.join(SPLIT_ARCHS)} only (this model is {arch}: its later "
                       f"layers need state from earlier ones); use a Gemma 3 model")
    if not (isinstance(split, int) and 0 < split < n_layers):
        raise AGPError(f"ring split b={split} leaves a rank without layers; choose 1 <= b <= {n_layers - 1} "
                       f"for this {n_layers}-layer model")


def check_args(args: RingSplitArgs, config: dict) -> None:
    """Every mistake that can be caught from the arguments and config.json, before a launch."""
    check_split(args.split, int(config["num_hidden_layers"]), config.get("model_type"))
    if args.new_tokens < 1:
        raise AGPError(f"ring split new_tokens must be at least 1, got {args.new_tokens}")
    if not args.timeout_s > 0:
        raise AGPError(f"ring split timeout_s must be positive, got {args.timeout_s}")
    if (args.prompt_ids is None) == (args.prompt_file is None):
        raise AGPError("give the ring split exactly one of prompt_ids or prompt_file")
    if args.prompt_ids is not None and not args.prompt_ids:
        raise AGPError("ring split prompt_ids is empty; give at least one token id")
    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        raise AGPError(f"ring split prompt file {args.prompt_file} does not exist; give a text file")
    vocab = int(config["vocab_size"])
    if args.prompt_ids is not None and not all(0 <= int(t) < vocab for t in args.prompt_ids):
        raise AGPError(f"ring split prompt_ids hold ids outside the model's vocabulary 0..{vocab - 1}; "
                       f"encode the prompt with this model's tokenizer")
    limit = int(config.get("max_position_embeddings", 32768))
    n = len(args.prompt_ids) if args.prompt_ids is not None else 0
    if n + args.new_tokens > limit:
        raise AGPError(f"prompt of {n} tokens plus {args.new_tokens} new tokens is over the model's context of "
                       f"{limit}; shorten the prompt or lower new_tokens")


# --- the rank side -------------------------------------------------------------------------
class PeerLost(AGPError):
    """The peer rank died or stopped answering."""


# The watchdog runs as a tiny child process, not a thread: mx.distributed.init() blocks holding the
# GIL (seen: a stalled peer froze the rank's watchdog thread until the peer died), so only another
# process can bound it. The rank writes "label|phase" lines; silence for `timeout` seconds means
# the peer is gone: the child prints the one line and kills the rank. EOF means the rank is done.
_WATCHDOG = r"""
import os, select, sys
fd, timeout, rank = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
last = b"ring split rank|starting"
while True:
    if not select.select([fd], [], [], timeout)[0]:
        label, _, phase = last.decode(errors="replace").partition("|")
        sys.stderr.write(f"agp: error: {label}: no answer for {timeout:g} s after {phase} "
                         f"(a rank died or stalled); rerun, or raise RingSplitArgs.timeout_s\n")
        sys.stderr.flush()
        os.kill(rank, 9)
        break
    data = os.read(fd, 1 << 16)
    if not data:
        break
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
"""


class PeerBound:
    """Bounded waits on the peer (agp.train.distributed.PeerWatch's rule, which this layer may
    not import): `kick(phase)` after every message; with no kick for `timeout` seconds a watchdog
    process prints one line and ends the rank, since nothing inside it can interrupt a wait blocked
    in MLX. SIGTERM from the launcher (the other rank ended) becomes PeerLost in the main thread."""

    def __init__(self, label: str, timeout: float):
        self.label, self.timeout, self.phase = label, float(timeout), "starting"
        self._fd, self._child, self._old_term = None, None, None

    def __enter__(self):
        r, self._fd = os.pipe()
        self._child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(r), str(self.timeout),
                                        str(os.getpid())], pass_fds=(r,), stdin=subprocess.DEVNULL)
        os.close(r)
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, exc_type, *exc):
        os.close(self._fd)   # EOF: the watchdog exits
        self._child.wait()
        if self._old_term is not None:
            # a rank ending with an error must print its line before the launcher's SIGTERM lands
            ending = exc_type is not None and issubclass(exc_type, Exception)
            signal.signal(signal.SIGTERM, signal.SIG_IGN if ending else self._old_term)
        return False

    def kick(self, phase: str) -> None:
        self.phase = phase
        os.write(self._fd, f"{self.label}|{phase}\n".encode())

    def _on_term(self, signum, frame):
        raise PeerLost(f"{self.label}: stopped by the launcher after {self.phase} (the other rank ended); "
                       f"read its error line above")


class Wire:
    """Point-to-point messages to the one peer, each bounded by the PeerBound and counted."""

    def __init__(self, group, rank: int, bound: PeerBound):
        self.group, self.peer, self.bound = group, 1 - rank, bound
        self.sent = self.received = 0

    def send(self, x: mx.array, what: str) -> None:
        mx.eval(mx.distributed.send(x, self.peer, group=self.group, stream=mx.cpu))
        self.sent += x.nbytes
        self.bound.kick(f"sending {what}")

    def recv(self, shape, dtype, what: str) -> mx.array:
        x = mx.distributed.recv(shape, dtype, self.peer, group=self.group, stream=mx.cpu)
        mx.eval(x)
        self.received += x.nbytes
        self.bound.kick(f"receiving {what}")
        return x

    def agree(self, what: dict, label: str) -> None:
        """Both ranks hold the same settings and model, or the same one-line error on both."""
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).digest()
        row = mx.array(np.frombuffer(digest, dtype=np.uint8).astype(np.float32))[None]
        rows = np.asarray(mx.distributed.all_gather(row, group=self.group, stream=mx.cpu))
        self.bound.kick("comparing settings")
        if not np.array_equal(rows[0], rows[1]):
            raise AGPError(f"{label}: the two ranks do not hold the same ring split settings or model (compared: "
                           f"{', '.join(sorted(what))}); start both from one run_ring_split call")


def backend_name() -> str:
    env = os.environ
    if env.get("MLX_JACCL_COORDINATOR") or env.get("MLX_IBV_DEVICES"):
        return "jaccl"
    return "ring" if env.get("MLX_HOSTFILE") else "unknown"


def join_group():
    """The two-rank group `mlx.launch` set up (joining blocks until both ranks are up)."""
    if not any(k.startswith("MLX_") for k in os.environ):
        raise AGPError("agp.serve.ring runs as a rank under `mlx.launch -n 2`; call run_ring_split() instead")
    try:
        group = mx.distributed.init()
    except RuntimeError as e:
        raise AGPError(f"could not join the distributed group ({e}); start both ranks with one mlx.launch") from None
    if group.size() != 2:
        raise AGPError(f"the ring split needs exactly 2 ranks, this launch has {group.size()}; use mlx.launch -n 2")
    return group


def boundary_dtype(bb, split: int):
    """The dtype of the state after layers [0, b): both ranks compute it from one cache-free token,
    so the receiver knows what to expect before anything crosses."""
    p = bb.start(mx.array([[bb.bos_id or 0]]))
    return p.run(p.h0, 0, split).dtype


def prompt_ids(bb, args: RingSplitArgs) -> list[int]:
    if args.prompt_ids is not None:
        return [int(t) for t in args.prompt_ids]
    return bb.encode(Path(args.prompt_file).read_text())


def chunks(n: int) -> list[tuple[int, int]]:
    """mlx-lm's prefill chunks of `n` ids, as (start, stop)."""
    return [(a, min(a + PREFILL_STEP, n)) for a in range(0, n, PREFILL_STEP)]


def eos_ids(bb) -> set[int]:
    return set(getattr(bb.tokenizer, "eos_token_ids", None) or [])


def lead(bb, args: RingSplitArgs, ids: list[int], wire: Wire, dtype) -> dict:
    """Rank 0: embedding and layers [0, b); returns the measured result."""
    b, cache = args.split, bb.make_cache()
    pre = ids[:-1]
    t0 = time.perf_counter()
    wire.send(mx.array([len(pre)], TOKEN_DTYPE), "the prompt length")
    header = wire.sent
    for a, z in chunks(len(pre)):
        p = bb.start(mx.array([pre[a:z]]), cache)
        h = p.run(p.h0, 0, b)
        mx.eval([c.state for c in cache[:b]], h)
        wire.send(h, f"the prefill states of tokens {a}-{z}")
    wire.recv((1,), TOKEN_DTYPE, "the end of prefill")
    prefill_s, prefill_bytes = time.perf_counter() - t0, wire.sent - header
    tokens, rtt, local, pending = [], [], [], ids[-1]
    stop = eos_ids(bb) if args.stop_at_eos else set()
    sent0, got0, t1 = wire.sent, wire.received, time.perf_counter()
    for _ in range(args.new_tokens):
        s = time.perf_counter()
        p = bb.start(mx.array([[pending]]), cache)
        wire.send(p.run(p.h0, 0, b), "a token's boundary state")
        local.append(time.perf_counter() - s)
        pending = int(wire.recv((1,), TOKEN_DTYPE, "a greedy token").item())
        rtt.append(time.perf_counter() - s)
        if pending in stop:
            break   # like mlx-lm: EOS ends decoding and is not emitted
        tokens.append(pending)
    decode_s, steps = time.perf_counter() - t1, len(rtt)
    ms = np.asarray(rtt) * 1e3
    return {"tokens": tokens, "tokens_per_s": len(tokens) / decode_s if decode_s > 0 else 0.0,
            "prefill_s": prefill_s, "decode_s": decode_s, "steps": steps,
            "rtt_ms_p50": float(np.percentile(ms, 50)), "rtt_ms_p99": float(np.percentile(ms, 99)),
            "rank0_ms_p50": float(np.percentile(np.asarray(local) * 1e3, 50)),
            "state_bytes_per_token": (wire.sent - sent0) // steps,
            "token_bytes_per_token": (wire.received - got0) // steps, "prefill_state_bytes": prefill_bytes,
            "prompt_tokens": len(ids)}


def follow(bb, args: RingSplitArgs, wire: Wire, dtype) -> None:
    """Rank 1: layers [b, L), the head and the greedy choice, fed by rank 0's states."""
    from agp.runtime.full import greedy

    b, L, H, cache = args.split, bb.n_layers, bb.hidden_size, bb.make_cache()
    n = int(wire.recv((1,), TOKEN_DTYPE, "the prompt length").item())
    for a, z in chunks(n):
        h = bb.run_layers(wire.recv((1, z - a, H), dtype, f"the prefill states of tokens {a}-{z}"), b, L, cache)
        mx.eval([c.state for c in cache[b:]], h)
    wire.send(mx.array([n], TOKEN_DTYPE), "the end of prefill")
    stop = eos_ids(bb) if args.stop_at_eos else set()
    for _ in range(args.new_tokens):
        h = bb.run_layers(wire.recv((1, 1, H), dtype, "a token's boundary state"), b, L, cache)
        tok = greedy(bb.head(h[:, -1])).astype(TOKEN_DTYPE)
        wire.send(tok, "a greedy token")
        if int(tok.item()) in stop:
            break


def serve_rank(args: RingSplitArgs, out: Path | None) -> None:
    from agp.backbone import load

    label = f"ring split rank {os.environ.get('MLX_RANK', '?')} of 2"
    with PeerBound(label, args.timeout_s) as bound:
        bound.kick("joining the group")
        group = join_group()
        rank = group.rank()
        bb = load(args.model, adapter=args.adapter)
        check_split(args.split, bb.n_layers, bb.arch)
        bound.kick("loading the model")
        wire, dtype = Wire(group, rank, bound), boundary_dtype(bb, args.split)
        wire.agree({"args": asdict(args), "model": bb.fingerprint, "n_layers": bb.n_layers,
                    "hidden": bb.hidden_size, "dtype": str(dtype)}, label)
        if rank == 1:
            follow(bb, args, wire, dtype)
            return
        ids = prompt_ids(bb, args)
        result = lead(bb, args, ids, wire, dtype)
    result |= {"backend": backend_name(), "world_size": group.size(), "split": args.split,
               "n_layers": bb.n_layers, "hidden_size": bb.hidden_size, "state_dtype": str(dtype).rpartition(".")[2],
               "model": str(bb.path)}
    if out is not None:
        io.write_json(out, result)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agp.serve.ring", description="one rank of the ring split")
    ap.add_argument("--json-args", required=True, help="RingSplitArgs as JSON")
    ap.add_argument("--out", default=None, help="where rank 0 writes its result JSON")
    ns = ap.parse_args(argv)
    rank = os.environ.get("MLX_RANK", "?")
    try:
        args = RingSplitArgs.from_dict(json.loads(Path(ns.json_args).read_text()))
        serve_rank(args, Path(ns.out) if ns.out else None)
    except AGPError as e:
        where = "" if str(e).startswith("ring split rank") else f"ring split rank {rank} of 2: "
        print(f"agp: error: {where}{e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:   # MLX's backends: "[ring] connection to a peer was lost" and the like
        print(f"agp: error: ring split rank {rank} of 2: the peer connection failed ({str(e).splitlines()[0]}); "
              f"rerun", file=sys.stderr, flush=True)
        return 2
    return 0


# --- the launcher --------------------------------------------------------------------------
def launcher() -> Path:
    beside = Path(sys.executable).with_name("mlx.launch")
    found = beside if beside.exists() else shutil.which("mlx.launch")
    if not found:
        raise AGPError(f"mlx.launch is not installed beside {sys.executable} nor on PATH; install mlx "
                       f"(it ships mlx.launch) in this environment")
    return Path(found)


def clean_env(env=os.environ) -> dict:
    """`env` without any launcher's variables (a run started from inside a rank must not join its
    group), with this package importable by the ranks."""
    out = {k: v for k, v in env.items() if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}
    root = str(Path(__file__).resolve().parents[2])
    out["PYTHONPATH"] = os.pathsep.join([root] + ([out["PYTHONPATH"]] if out.get("PYTHONPATH") else []))
    return out


def launch_command(args_file: Path, out_file: Path, starting_port: int) -> list[str]:
    return [str(launcher()), "-n", "2", "--backend", "ring", "--hosts", "127.0.0.1",
            "--starting-port", str(starting_port), "--",
            sys.executable, "-m", "agp.serve.ring", "--json-args", str(args_file), "--out", str(out_file)]


def _run_bounded(cmd: list[str], timeout_s: float) -> tuple[str, str]:
    """Run `cmd` in its own process group; on timeout the whole group (launcher and ranks) is killed."""
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=clean_env(), text=True, start_new_session=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # stdin stays an open, silent pipe: mlx.launch polls its stdin to forward it, and would spin on EOF
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AGPError(f"the ring split did not finish in {timeout_s:g} s (mlx.launch and both ranks killed); "
                       f"raise timeout_s, or lower new_tokens or the prompt length") from None


def failure_line(stdout: str, stderr: str) -> str:
    """The ranks' own one-line errors when they printed any, else the tail of the output."""
    lines = [ln.strip() for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()]
    ours = [ln[ln.index("agp: error: ") + len("agp: error: "):] for ln in lines if "agp: error: " in ln]
    return "; ".join(dict.fromkeys(ours)) if ours else " | ".join(lines[-6:])[-1500:] or "no output"


def run_ring_split(args: RingSplitArgs, starting_port: int = 32323, timeout_s: float = 300.0) -> RingResult:
    """Greedy decoding split at layer `args.split` across two ranks on this host (ring over loopback).
    Returns rank 0's measurements; any failure is one AGPError line."""
    path = model_dir(args.model)
    check_args(args, json.loads((path / "config.json").read_text()))
    cmd_args = RingSplitArgs(**{**asdict(args), "model": str(path)})
    with tempfile.TemporaryDirectory(prefix="agp-ring-") as tmp:
        args_file, out_file = Path(tmp) / "args.json", Path(tmp) / "result.json"
        io.write_json(args_file, asdict(cmd_args))
        stdout, stderr = _run_bounded(launch_command(args_file, out_file, starting_port), timeout_s)
        # mlx.launch exits 0 whatever its ranks did: rank 0's result file is the proof of success
        if not out_file.exists():
            raise AGPError(f"the ring split failed: {failure_line(stdout, stderr)}")
        return RingResult.from_dict(json.loads(out_file.read_text()))


if __name__ == "__main__":
    sys.exit(main())
