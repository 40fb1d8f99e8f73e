"""mlx-lm tuner glue: adapters on chosen blocks, training through `mlx_lm.tuner.trainer.train`,
atomic checkpoints with resume, a tqdm progress bar, and the saved adapter directory.

The training loop is mlx-lm's own (`train`, `default_loss`, `iterate_batches`, `TrainingArgs`,
`linear_to_lora_layers`, `build_schedule`); AGP adds what a long run on a shared machine needs:
  - checkpoints every N steps from the trainer's report callback: adapter weights, optimizer state
    (which carries the LR-schedule step) and a state.json written last, each file atomically;
  - resume: the batch stream is seeded and the batches already consumed are skipped, so an
    interrupted run continues with exactly the batches it would have seen;
  - progress: mlx-lm's rich TrainUI is swapped for a tqdm bar showing loss and tokens/s.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from agp import io
from agp.backbone.adapters import CONFIG, WEIGHTS


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
    """<dir>/state.json names the latest complete checkpoint; it is written last."""

    def __init__(self, root: Path, fingerprint: str):
        self.root = Path(root)
        self.fingerprint = fingerprint   # config + data identity: a checkpoint from other settings is ignored

    def save(self, step: int, model, optimizer, extra: dict) -> None:
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
        if not path.exists():
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
    """An mlx-lm TrainingCallback (same two methods): records step time, loss, tokens/s and
    writes checkpoints."""

    def __init__(self, ckpt: Checkpoints, model, optimizer, offset: int, every: int, history: list):
        self.ckpt, self.model, self.optimizer = ckpt, model, optimizer
        self.offset, self.every, self.history = offset, every, history
        self.last = time.perf_counter()

    def on_train_loss_report(self, info: dict):
        step = self.offset + info["iteration"]
        now = time.perf_counter()
        self.history.append({"step": step, "loss": float(info["train_loss"]),
                             "tokens_per_second": float(info["tokens_per_second"]),
                             "step_seconds": 1.0 / float(info["iterations_per_second"]),
                             "wall_seconds": now - self.last, "peak_memory_gb": float(info["peak_memory"])})
        self.last = now
        if self.every and step % self.every == 0:
            self.ckpt.save(step, self.model, self.optimizer, {"history": self.history})

    def on_val_loss_report(self, info: dict):
        pass


def _seeded_batches(seed: int, skip: int):
    """mlx-lm's iterate_batches with a fixed seed, skipping the first `skip` batches (resume)."""
    from mlx_lm.tuner.trainer import iterate_batches

    def it(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **kw):
        gen = iterate_batches(dataset, batch_size, max_seq_length, loop=loop, seed=seed, comm_group=comm_group)
        for _ in range(skip):
            next(gen)
        yield from gen
    return it


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


def fit(model, train_set: list, *, iters: int, batch_size: int, max_seq: int, learning_rate: float,
        warmup: int, seed: int, ckpt: Checkpoints, every: int) -> dict:
    """Train the attached adapters for `iters` steps with mlx-lm's trainer, resuming from `ckpt`.
    train_set: [(token ids, first scored index)]. Returns the step history and resume info."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import build_schedule

    sched = build_schedule({"name": "cosine_decay", "arguments": [learning_rate, max(iters, 1), learning_rate * 0.1],
                            "warmup": min(warmup, max(iters - 1, 0))})
    optimizer = optim.Adam(learning_rate=sched)
    st = ckpt.load()
    done, history = 0, []
    if st is not None:
        ckpt.restore(st, model, optimizer)
        done, history = int(st["step"]), list(st.get("history", []))
    remaining = iters - done
    if remaining > 0:
        scratch = Path(tempfile.mkdtemp(prefix=".trainer.", dir=ckpt.root.parent))
        args = TrainingArgs(batch_size=batch_size, iters=remaining, steps_per_report=1,
                            steps_per_eval=remaining + 1, steps_per_save=remaining + 1, max_seq_length=max_seq,
                            adapter_file=str(scratch / WEIGHTS))
        mx.random.seed(seed)
        try:
            with _tqdm_ui(done, iters):
                model.train()
                train(model=model, optimizer=optimizer, train_dataset=train_set, val_dataset=None, args=args,
                      iterate_batches=_seeded_batches(seed, done),
                      training_callback=_Reporter(ckpt, model, optimizer, done, every, history))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        ckpt.save(iters, model, optimizer, {"history": history})
    model.eval()
    return {"history": history, "resumed_from": done, "steps": iters}


def save_adapter(dest: Path, model, config: dict, meta: dict) -> None:
    """Write the adapter directory (mlx-lm layout + AGP metadata) beside `dest`, then rename it in."""
    with io.atomic_dir(dest) as tmp:
        io.write_safetensors(tmp / WEIGHTS, dict(tree_flatten(model.trainable_parameters())))
        io.write_json(tmp / CONFIG, {**config, "agp": {**meta, "weights_sha256": io.sha256_file(tmp / WEIGHTS)}})
