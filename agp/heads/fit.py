"""The one minibatch loop the small heads train with (AdamW on a frozen backbone's states)."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from agp.errors import AGPError


def fit_minibatches(params, loss_fn, data: tuple, args, what: str, fix: str, progress=None,
                    key: str = "loss") -> list[dict]:
    """`args.steps` AdamW steps (`lr`, `weight_decay`, `batch`, `seed`) of `loss_fn(*rows)` on random
    rows of every array in `data`; `params` (an nn.Module) is updated in place. A non-finite loss
    stops with one line naming `what` diverged and `fix`. Returns the loss every 50 steps."""
    n = len(data[0])
    opt = optim.AdamW(learning_rate=args.lr, weight_decay=args.weight_decay)
    step = nn.value_and_grad(params, loss_fn)
    rng = np.random.default_rng(args.seed)
    hist = []
    for i in range(1, args.steps + 1):
        idx = mx.array(rng.choice(n, size=min(args.batch, n), replace=False))
        loss, grads = step(*(x[idx] for x in data))
        opt.update(params, grads)
        mx.eval(params.parameters(), opt.state, loss)
        if not np.isfinite(loss.item()):
            raise AGPError(f"{what} diverged at step {i} (loss {loss.item()}); {fix}")
        if progress is not None:
            progress.update(1)
        if i == 1 or i % 50 == 0 or i == args.steps:
            hist.append({"step": i, key: float(loss.item())})
    return hist
