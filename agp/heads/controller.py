"""The controller: one small MLX MLP trunk over a few hidden layers, with route / vitality /
earliest-layer heads. It reads hidden states only (no LM-head pass): one decision costs
in x hidden + hidden x outputs MACs, checked against one transformer layer's MACs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from agp import io
from agp.calibrate.metrics import macro_f1
from agp.config import ConfigMixin
from agp.errors import AGPError

TASKS = ("route", "vitality", "earliest")


@dataclass
class HeadArgs(ConfigMixin):
    hidden: int = 64              # trunk width
    steps: int = 300              # training steps per head variant
    lr: float = 2e-3              # AdamW learning rate
    weight_decay: float = 1e-1    # AdamW weight decay
    dropout: float = 0.3          # trunk dropout
    eval_every: int = 25          # steps between validation checks (early stopping)
    seed: int = 0                 # initialisation and batch order
    tasks: list = field(default_factory=lambda: list(TASKS))


class Heads(nn.Module):
    """Shared trunk + one linear head per task."""

    def __init__(self, n_in: int, n_out: dict[str, int], hidden: int, dropout: float):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout))
        self.heads = {t: nn.Linear(hidden, k) for t, k in n_out.items()}

    def __call__(self, x):
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


class Controller:
    """Feature standardisation + Heads; `logits(features)` -> {task: [N, K] numpy}."""

    def __init__(self, n_in: int, n_out: dict[str, int], args: HeadArgs, mean=None, std=None):
        self.args, self.n_in, self.n_out = args, n_in, dict(n_out)
        self.mean = np.zeros(n_in, np.float32) if mean is None else np.asarray(mean, np.float32)
        self.std = np.ones(n_in, np.float32) if std is None else np.asarray(std, np.float32)
        self.model = Heads(n_in, self.n_out, args.hidden, args.dropout)

    def _x(self, feats: np.ndarray) -> mx.array:
        f = np.asarray(feats, np.float32)
        if f.ndim != 2 or f.shape[1] != self.n_in:
            raise AGPError(f"controller expects [N, {self.n_in}] features, got {f.shape}")
        if not np.isfinite(f).all():
            raise AGPError("non-finite hidden states given to the controller; refusing to decide on NaN/inf")
        return mx.array((f - self.mean) / self.std)

    def logits(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        self.model.eval()
        out = self.model(self._x(feats))
        mx.eval(out)
        return {t: np.asarray(v) for t, v in out.items()}

    def macs(self) -> int:
        """Multiply-accumulates per decision (all heads)."""
        return self.n_in * self.args.hidden + self.args.hidden * sum(self.n_out.values())

    def save(self, d: Path) -> None:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        w = dict(tree_flatten(self.model.parameters()))
        io.write_safetensors(d / "heads.safetensors", w)
        with io.atomic_path(d / "norm.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mean=self.mean, std=self.std)
        io.write_json(d / "heads.json", {"n_in": self.n_in, "n_out": self.n_out, "args": self.args.to_dict()})

    @classmethod
    def load(cls, d: Path) -> "Controller":
        d = Path(d)
        if not (d / "heads.json").exists():
            raise AGPError(f"no controller heads at {d} (heads.json missing); run `agp run --stage controller`")
        meta = json.loads((d / "heads.json").read_text())
        norm = np.load(d / "norm.npz")
        c = cls(meta["n_in"], meta["n_out"], HeadArgs.from_dict(meta["args"]), norm["mean"], norm["std"])
        c.model.load_weights(str(d / "heads.safetensors"))
        return c


def class_weights(y: np.ndarray, k: int) -> np.ndarray:
    """Inverse-frequency weights (mean 1 over samples), so rare actions are not ignored."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w = np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)


def train(feats: dict[str, np.ndarray], labels: dict[str, dict[str, np.ndarray]], n_out: dict[str, int],
          args: HeadArgs, progress=None) -> tuple[Controller, dict]:
    """Train the heads in `args.tasks` on feats['train'], keep the step with the best valid route macro-F1."""
    x_tr = feats["train"]
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-5
    tasks = [t for t in args.tasks if t in n_out]
    if "route" not in tasks:
        raise AGPError("the controller needs the route head; tasks must include 'route'")
    mx.random.seed(args.seed)
    ctl = Controller(x_tr.shape[1], {t: n_out[t] for t in tasks}, args, mean, std)
    inputs = ctl._x(x_tr)
    targets = {t: mx.array(labels["train"][t].astype(np.int32)) for t in tasks}
    weights = {t: mx.array(class_weights(labels["train"][t], n_out[t])) for t in tasks}

    def loss_fn(model, x):
        out = model(x)
        return sum((nn.losses.cross_entropy(out[t], targets[t]) * weights[t][targets[t]]).mean() for t in tasks)

    opt = optim.AdamW(learning_rate=args.lr, weight_decay=args.weight_decay)
    step = nn.value_and_grad(ctl.model, loss_fn)
    best, best_f1, hist = None, -1.0, []
    for i in range(1, args.steps + 1):
        ctl.model.train()
        loss, grads = step(ctl.model, inputs)
        opt.update(ctl.model, grads)
        mx.eval(ctl.model.parameters(), opt.state, loss)
        if progress is not None:
            progress.update(1)
        if not np.isfinite(loss.item()):
            raise AGPError(f"controller training diverged (loss {loss.item()} at step {i}); "
                           f"lower the heads' learning rate (--controller-heads-lr, now {args.lr})")
        if i % args.eval_every == 0 or i == args.steps:
            f1 = macro_f1(labels["valid"]["route"], ctl.logits(feats["valid"])["route"].argmax(1), n_out["route"])
            hist.append({"step": i, "loss": float(loss.item()), "valid_route_macro_f1": f1})
            if f1 > best_f1:
                best_f1, best = f1, {k: mx.array(v) for k, v in tree_flatten(ctl.model.parameters())}
    ctl.model.load_weights(list(best.items()))
    return ctl, {"history": hist, "best_valid_route_macro_f1": best_f1}


def load_deployed(d: Path) -> tuple[Controller, dict]:
    """The saved controller and its calibration (temperatures, thresholds, abstain gate)."""
    d = Path(d)
    ctl = Controller.load(d)
    if not (d / "calibration.json").exists():
        raise AGPError(f"no calibration.json in {d}; rerun `agp run --stage controller`")
    return ctl, json.loads((d / "calibration.json").read_text())


def route_decisions(ctl: Controller, calib: dict, feats: np.ndarray) -> dict[str, np.ndarray]:
    """Calibrated route probabilities, the thresholded actions, their confidence and the abstain flags."""
    from agp.calibrate import policy
    from agp.calibrate.temperature import softmax

    probs = softmax(ctl.logits(feats)["route"], calib["temperatures"]["route"])
    act = policy.decide(probs, calib["thresholds"])
    conf = policy.confidence(probs, act)
    return {"probs": probs, "action": act, "confidence": conf, "abstain": conf < calib["abstain_gate"]}
