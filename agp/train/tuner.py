"""mlx-lm tuner glue: adapters on chosen blocks, training through `mlx_lm.tuner.trainer.train`,
atomic checkpoints with resume, a tqdm progress bar, and the saved adapter directory.

The training loop is mlx-lm's own (`train`, `default_loss`, `iterate_batches`, `TrainingArgs`,
`linear_to_lora_layers`, `build_schedule`); AGP adds what a long run on a shared machine needs:
  - checkpoints every N steps from the trainer's report callback: adapter weights, optimizer state
    (which carries the LR-schedule step) and a state.json written last, each file atomically;
  - resume: the batch stream is seeded and the batches already consumed are skipped, so an
    interrupted run continues with exactly the batches it would have seen;
  - progress: mlx-lm's rich TrainUI is swapped for a tqdm bar showing loss and tokens/s;
  - across ranks (agp/train/distributed.py): the trainer's own batch split and gradient average,
    a token-weighted loss, one start state broadcast from rank 0, only rank 0 writing, and a
    bounded wait on peers.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from agp import io
from agp.backbone.adapters import CONFIG, WEIGHTS
from agp.errors import AGPError
from agp.train import distributed
from agp.train.distributed import World


def attach(model, kind: str, blocks: int, rank: int, scale: float, dropout: float, keys=None) -> dict:
    """Freeze the base and put LoRA/DoRA on the last `blocks` blocks; returns mlx-lm's adapter config."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    params = {"rank": rank, "scale": scale, "dropout": dropout}
    if keys:
        params["keys"] = list(keys)
    model.freeze()
    linear_to_lora_layers(model, blocks, params, use_dora=(kind == "dora"))
    return {"fine_tune_type": kind, "num_layers": blocks, "lora_parameters": params}


def trainable_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


class Checkpoints:
    """<dir>/state.json names the latest complete checkpoint; it is written last. A reader-only
    instance (writer=False: ranks other than 0) neither writes nor reads: it starts from what
    rank 0 broadcasts."""

    def __init__(self, root: Path, fingerprint: str, writer: bool = True):
        self.root = Path(root)
        self.fingerprint = fingerprint   # config + data identity: a checkpoint from other settings is ignored
        self.writer = writer

    def save(self, step: int, model, optimizer, extra: dict) -> None:
        if not self.writer:
            return
        mx.eval(model.trainable_parameters(), optimizer.state)
        w, o = self.root / f"adapters.{step:07d}.safetensors", self.root / f"optimizer.{step:07d}.safetensors"
        io.write_safetensors(w, dict(tree_flatten(model.trainable_parameters())))
        io.write_safetensors(o, dict(tree_flatten(optimizer.state)))
        io.write_json(self.root / "state.json", {"step": step, "adapters": w.name, "optimizer": o.name,
                                                 "fingerprint": self.fingerprint, **extra})
        for old in self.root.glob("*.safetensors"):
            if old.name not in (w.name, o.name):
                old.unlink()

    def load(self) -> dict | None:
        """The latest checkpoint's state if it matches this run's settings, else None."""
        path = self.root / "state.json"
        if not self.writer or not path.exists():
            return None
        try:
            st = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if st.get("fingerprint") != self.fingerprint or not (self.root / st["adapters"]).exists():
            return None
        return st

    def restore(self, st: dict, model, optimizer) -> None:
        model.load_weights(list(mx.load(str(self.root / st["adapters"])).items()), strict=False)
        optimizer.state = tree_unflatten(list(mx.load(str(self.root / st["optimizer"])).items()))
        mx.eval(model.trainable_parameters(), optimizer.state)


class TqdmUI:
    """Stand-in for mlx-lm's TrainUI: one tqdm bar with loss and tokens/s."""

    def __init__(self, total_iters: int, rank: int = 0, start: int = 0, total: int | None = None):
        self.bar = tqdm(total=total or total_iters, initial=start, desc="adapter", unit="step",
                        disable=rank != 0, dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        return False

    def advance(self):
        self.bar.update(1)

    def report_train(self, it, train_loss, tokens_sec, trained_tokens):
        self.bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_sec:.0f}", refresh=False)

    @contextlib.contextmanager
    def val_task(self, total):
        yield lambda *a, **k: None

    def report_val(self, it, val_loss, val_time):
        self.bar.set_postfix(val_loss=f"{val_loss:.3f}", refresh=False)

    def report_save(self, path):
        pass


class _Reporter:
    """An mlx-lm TrainingCallback (same two methods): records step time, loss, tokens/s (the
    global batch's and this rank's), writes checkpoints, and tells the peer watch that the step's
    collectives returned."""

    def __init__(self, ckpt: Checkpoints, model, optimizer, offset: int, every: int, history: list,
                 batches: "_Batches", watch: distributed.PeerWatch):
        self.ckpt, self.model, self.optimizer = ckpt, model, optimizer
        self.offset, self.every, self.history = offset, every, history
        self.batches, self.watch = batches, watch
        self.last = time.perf_counter()

    def on_train_loss_report(self, info: dict):
        step = self.offset + info["iteration"]
        now = time.perf_counter()
        self.history.append({"step": step, "loss": float(info["train_loss"]),
                             "tokens_per_second": float(info["tokens_per_second"]),
                             "rank_tokens": self.batches.scored.pop(0),
                             "step_seconds": 1.0 / float(info["iterations_per_second"]),
                             "wall_seconds": now - self.last, "peak_memory_gb": float(info["peak_memory"])})
        self.last = now
        self.watch.kick(f"step {step}")
        if self.every and step % self.every == 0:
            self.ckpt.save(step, self.model, self.optimizer, {"history": self.history})

    def on_val_loss_report(self, info: dict):
        pass


class _Batches:
    """mlx-lm's iterate_batches with a fixed seed, skipping the first `skip` batches (resume),
    noting how many tokens each of this rank's batches scores (default_loss's mask)."""

    def __init__(self, seed: int, skip: int):
        self.seed, self.skip, self.scored = seed, skip, []

    def __call__(self, dataset, batch_size, max_seq_length, loop=False, comm_group=None, **kw):
        from mlx_lm.tuner.trainer import iterate_batches

        gen = iterate_batches(dataset, batch_size, max_seq_length, loop=loop, seed=self.seed, comm_group=comm_group)
        for _ in range(self.skip):
            next(gen)
        for batch, lengths in gen:
            self.scored.append(_scored_tokens(batch.shape[1], np.asarray(lengths)))
            yield batch, lengths


def _scored_tokens(width: int, lengths: np.ndarray) -> int:
    steps = np.arange(1, width)[None, :]
    return int(((steps >= lengths[:, :1]) & (steps <= lengths[:, 1:])).sum())


@contextlib.contextmanager
def _tqdm_ui(start: int, total: int):
    import mlx_lm.tuner.trainer as trainer
    if not hasattr(trainer, "TrainUI"):
        yield
        return
    orig = trainer.TrainUI
    trainer.TrainUI = lambda iters, rank=0: TqdmUI(iters, rank, start=start, total=total)
    try:
        yield
    finally:
        trainer.TrainUI = orig


SINGLE = World(None, 0, 1, None)


def fit(model, train_set: list, *, iters: int, batch_size: int, max_seq: int, learning_rate: float,
        warmup: int, seed: int, ckpt: Checkpoints, every: int, world: World = SINGLE,
        peer_timeout: float = 300.0) -> dict:
    """Train the attached adapters for `iters` steps with mlx-lm's trainer, resuming from `ckpt`.
    train_set: [(token ids, first scored index)]. With a `world` of several ranks, `batch_size`
    is the global batch (each rank takes batch_size / size of it) and every rank calls this.
    Returns the step history, resume info and each rank's throughput."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import build_schedule

    if batch_size % world.size:
        raise AGPError(f"--adapter-batch {batch_size} does not split over {world.size} ranks (each rank takes an "
                       f"equal share of the global batch); use a multiple of {world.size}")
    sched = build_schedule({"name": "cosine_decay", "arguments": [learning_rate, max(iters, 1), learning_rate * 0.1],
                            "warmup": min(warmup, max(iters - 1, 0))})
    optimizer = optim.Adam(learning_rate=sched)
    with distributed.PeerWatch(world, peer_timeout) as watch:
        done, history = _start(world, model, optimizer, ckpt, watch)
        if iters > done:
            args = dict(batch_size=batch_size, iters=iters, max_seq=max_seq, seed=seed, every=every)
            _train(world, model, optimizer, train_set, ckpt, done, history, watch, **args)
            ckpt.save(iters, model, optimizer, {"history": history})
        ranks = _rank_throughput(world, history, done, watch)
    model.eval()
    return {"history": history, "resumed_from": done, "steps": iters, "ranks": ranks}


def _start(w: World, model, optimizer, ckpt: Checkpoints, watch) -> tuple[int, list]:
    """Resume from rank 0's checkpoint when it has one; then every rank holds rank 0's adapter and
    optimizer state (the fresh adapter is seeded alike on every rank; broadcasting makes it sure)."""
    st = ckpt.load()
    done, history = 0, []
    if st is not None:
        ckpt.restore(st, model, optimizer)
        done, history = int(st["step"]), list(st.get("history", []))
    if w.size > 1:
        optimizer.init(model.trainable_parameters())   # the same state tree on every rank
        try:
            done = distributed.broadcast_int(w, done)
            params = distributed.broadcast(w, dict(tree_flatten(model.trainable_parameters())))
            state = distributed.broadcast(w, dict(tree_flatten(optimizer.state)))
        except RuntimeError as e:
            raise distributed.lost(w, "the start-state broadcast", e) from None
        model.load_weights(list(params.items()), strict=False)
        optimizer.state = tree_unflatten(list(state.items()))
        watch.kick(f"the start-state broadcast (from step {done})")
    return done, history


def _train(w: World, model, optimizer, train_set, ckpt, done, history, watch, *, batch_size, iters, max_seq,
           seed, every) -> None:
    from mlx_lm.tuner.trainer import TrainingArgs, default_loss, train

    remaining = iters - done
    scratch = Path(tempfile.mkdtemp(prefix=".trainer.", dir=ckpt.root.parent))
    args = TrainingArgs(batch_size=batch_size, iters=remaining, steps_per_report=1,
                        steps_per_eval=remaining + 1, steps_per_save=remaining + 1, max_seq_length=max_seq,
                        adapter_file=str(scratch / WEIGHTS))
    batches = _Batches(seed, done)
    mx.random.seed(seed)
    try:
        with _tqdm_ui(done, iters):
            model.train()
            train(model=model, optimizer=optimizer, train_dataset=train_set, val_dataset=None, args=args,
                  loss=distributed.token_weighted(default_loss, w), iterate_batches=batches,
                  training_callback=_Reporter(ckpt, model, optimizer, done, every, history, batches, watch))
    except RuntimeError as e:
        if w.size == 1 or not distributed.is_peer_error(e):
            raise
        raise distributed.lost(w, watch.phase, e) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _rank_throughput(w: World, history: list, done: int, watch) -> list[dict]:
    """Tokens each rank scored per second of its own step time, in rank order; the steps this
    process ran, less the first (it compiles) when there are others."""
    mine = [h for h in history if h["step"] > done]
    timed = mine[1:] or mine
    tokens, seconds = sum(h["rank_tokens"] for h in timed), sum(h["step_seconds"] for h in timed)
    try:
        rows = distributed.gather_floats(w, [tokens, seconds])
    except RuntimeError as e:
        raise distributed.lost(w, "training (gathering throughput)", e) from None
    watch.kick("the throughput gather")
    return [{"rank": r, "steps": len(timed), "tokens": int(t), "seconds": round(float(s), 4),
             "tokens_per_second": round(t / s, 2) if s else None} for r, (t, s) in enumerate(rows)]


def save_adapter(dest: Path, model, config: dict, meta: dict) -> None:
    """Write the adapter directory (mlx-lm layout + AGP metadata) beside `dest`, then rename it in."""
    with io.atomic_dir(dest) as tmp:
        io.write_safetensors(tmp / WEIGHTS, dict(tree_flatten(model.trainable_parameters())))
        io.write_json(tmp / CONFIG, {**config, "agp": {**meta, "weights_sha256": io.sha256_file(tmp / WEIGHTS)}})
