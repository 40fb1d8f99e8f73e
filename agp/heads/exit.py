"""Shortlist exit head: a residual translator at exit layer E plus a head over V frequent tokens.

The full 262144 x 640 head is ~63% of a token's MACs, so an exit (or a draft) that pays it saves
little. This head reads the hidden state after E blocks, applies a residual affine translator
(h + h W + b, as the tuned lens), the backbone's own final norm, and then only the V rows of the
tied embedding that belong to the shortlist (the V most frequent tokens of the project's lanes),
plus a per-row logit bias. The rows stay the tied embedding rows (frozen, not saved); W, b and
the bias are trained by distillation: KL from the full-depth distribution restricted to the
shortlist. With W = b = bias = 0 (`ExitHead.identity`) it is exactly the logit lens restricted
to the shortlist: the baseline at step 0.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from agp import io
from agp.config import ConfigMixin
from agp.errors import AGPError
from agp.heads.fit import fit_minibatches


@dataclass
class ExitHeadArgs(ConfigMixin):
    layer: int = 6            # exit layer E (hidden state after E blocks)
    vocab: int = 16384        # shortlist size V
    steps: int = 300          # distillation steps
    batch: int = 256          # positions per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    ridge_init: bool = True   # start W, b from the ridge tuned-lens fit instead of zero
    seed: int = 0


def shortlist(token_lists, vocab_size: int, v: int, always=()) -> np.ndarray:
    """The v most frequent token ids over `token_lists` (ties: lower id), `always` first; sorted."""
    counts = Counter()
    for ids in token_lists:
        counts.update(int(t) for t in ids)
    chosen = list(dict.fromkeys(int(t) for t in always if 0 <= int(t) < vocab_size))
    for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) >= v:
            break
        if tok not in chosen:
            chosen.append(tok)
    if len(chosen) < v:       # pad with the lowest ids not seen, so V is what was asked
        seen = set(chosen)
        chosen += [t for t in range(vocab_size) if t not in seen][: v - len(chosen)]
    return np.array(sorted(chosen[:v]), np.int32)


class ExitParams(nn.Module):
    """The trainable part: translator delta W, bias b, per-row logit bias."""

    def __init__(self, hidden: int, v: int):
        super().__init__()
        self.W = mx.zeros((hidden, hidden))
        self.b = mx.zeros((hidden,))
        self.bias = mx.zeros((v,))


class ShortlistHead:
    """What every shortlist head shares: the tied embedding rows of the shortlist `ids`, the
    backbone's final norm, the teacher (the full head's shortlist columns), save and load of the
    trainable `params` (safetensors + JSON naming the shortlist and the model fingerprint)."""

    stem = "head"        # file names: <stem>.safetensors, <stem>.json

    def __init__(self, bb, ids: np.ndarray, params: nn.Module):
        self.hidden = bb.hidden_size
        self.ids_np = np.asarray(ids, np.int32)
        self.ids = mx.array(self.ids_np)
        self.norm = bb.model.model.norm
        emb = bb.model.model.embed_tokens
        if not hasattr(emb, "weight") or emb.weight.shape[0] != bb.vocab_size or bb.arch != "gemma3_text":
            raise AGPError("the shortlist exit head needs tied, unquantised embeddings (Gemma 3 layout)")
        self.rows = emb.weight[self.ids].astype(mx.float32)
        mx.eval(self.rows)
        self.params = params

    def teacher_logits(self, h_final: mx.array) -> mx.array:
        """The full-depth logits restricted to the shortlist (exactly the full head's columns)."""
        return self.norm(h_final) @ self.rows.T

    def shortlist_logits(self, h: mx.array) -> mx.array:
        """Final norm + shortlist rows + the per-row bias on a (predicted or translated) final state."""
        return self.norm(h) @ self.rows.T + self.params.bias

    def save(self, d: Path, meta: dict) -> None:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        w = dict(tree_flatten(self.params.parameters()))
        with io.atomic_path(d / f"{self.stem}.safetensors") as tmp:
            path = tmp.with_suffix(".safetensors")
            mx.save_safetensors(str(path), w)
            path.replace(tmp)
        io.write_json(d / f"{self.stem}.json", {**meta, **self.describe(), "vocab": len(self.ids_np),
                                                 "shortlist": self.ids_np.tolist()})

    def describe(self) -> dict:
        return {}

    @classmethod
    def read(cls, bb, d: Path, what: str) -> tuple[dict, np.ndarray, dict]:
        """(meta, shortlist ids, weights) of a saved head, checked for the model and for NaN."""
        d = Path(d)
        if not (d / f"{cls.stem}.json").exists():
            raise AGPError(f"no {what} at {d}; run `agp run --stage runtime`")
        meta = json.loads((d / f"{cls.stem}.json").read_text())
        if meta.get("model_fingerprint") not in (None, bb.fingerprint):
            raise AGPError(f"the {what} at {d} was trained for another model (fingerprint "
                           f"{str(meta.get('model_fingerprint'))[:12]}, this one {bb.fingerprint[:12]}); "
                           f"rerun `agp run --stage runtime` for this model")
        w = mx.load(str(d / f"{cls.stem}.safetensors"))
        for k, v in w.items():
            if not bool(mx.all(mx.isfinite(v)).item()):
                raise AGPError(f"{what} at {d} has non-finite values in '{k}'; it is corrupt: "
                               f"rerun `agp run --stage runtime`")
        return meta, np.asarray(meta["shortlist"], np.int32), w


class ExitHead(ShortlistHead):
    """Translator + final norm + shortlist rows; `logits(h)` over the shortlist, `ids` maps back."""

    stem = "exit_head"

    def __init__(self, bb, layer: int, ids: np.ndarray, params: ExitParams | None = None):
        if not 0 < layer < bb.n_layers:
            raise AGPError(f"exit layer must lie in 1..{bb.n_layers - 1}, got {layer}")
        self.layer = int(layer)
        super().__init__(bb, ids, params or ExitParams(bb.hidden_size, len(ids)))

    @classmethod
    def identity(cls, bb, layer: int, ids) -> "ExitHead":
        return cls(bb, layer, ids)

    def translate(self, h: mx.array) -> mx.array:
        p = self.params
        return h + h @ p.W + p.b

    def logits(self, h: mx.array) -> mx.array:
        """Shortlist logits [..., V] from hidden states after `layer` blocks."""
        return self.shortlist_logits(self.translate(h))

    def macs(self) -> int:
        return self.hidden * self.hidden + len(self.ids_np) * self.hidden

    def describe(self) -> dict:
        return {"layer": self.layer}

    @classmethod
    def load(cls, bb, d: Path) -> tuple["ExitHead", dict]:
        meta, ids, w = cls.read(bb, d, "exit head")
        params = ExitParams(bb.hidden_size, len(ids))
        params.load_weights(list(w.items()))
        return cls(bb, int(meta["layer"]), ids, params), meta


def ridge_start(head: ExitHead, h_e: np.ndarray, h_final: np.ndarray, ridge: float = 0.1) -> None:
    """Set W, b from the residual ridge tuned-lens fit (agp.oracle.probes.fit_translator)."""
    from agp.oracle.probes import fit_translator
    t = fit_translator(h_e, h_final, ridge)
    head.params.W = mx.array(t.W - np.eye(t.W.shape[0], dtype=np.float32))
    head.params.b = mx.array(t.b)


def distill(head, h_e: np.ndarray, h_final: np.ndarray, args: ExitHeadArgs, progress=None) -> dict:
    """Minimise KL(teacher restricted to the shortlist || head) over the positions given. `head` is
    any shortlist head (`logits(x)`, `teacher_logits(y)`, `params`); one with `aux_loss(x, y)`
    (the feature draft head's state regression) has it added."""
    mx.random.seed(args.seed)
    X, Y = mx.array(h_e.astype(np.float32)), mx.array(h_final.astype(np.float32))

    def loss_fn(params, x, y):
        head.params = params
        t = head.teacher_logits(y)
        logp = t - mx.logsumexp(t, axis=-1, keepdims=True)
        z = head.logits(x)
        logq = z - mx.logsumexp(z, axis=-1, keepdims=True)
        kl = (mx.exp(logp) * (logp - logq)).sum(-1).mean()
        return kl + head.aux_loss(x, y) if hasattr(head, "aux_loss") else kl

    params = head.params
    hist = fit_minibatches(params, lambda x, y: loss_fn(params, x, y), (X, Y), args,
                           "shortlist-head distillation", "lower the lr", progress, key="kl")
    head.params = params
    return {"history": hist}


def full_top1(bb, h_final: np.ndarray, batch: int = 64) -> np.ndarray:
    """The full-depth greedy token at each position (one 262144-wide head pass per batch)."""
    out = []
    for a in range(0, len(h_final), batch):
        t = mx.argmax(bb.head(mx.array(h_final[a:a + batch])), axis=-1)
        mx.eval(t)
        out.append(np.asarray(t))
    return np.concatenate(out)


def evaluate(head: ExitHead, h_e: np.ndarray, h_final: np.ndarray, top1: np.ndarray, batch: int = 256) -> dict:
    """Top-1 agreement with full depth (`top1` from `full_top1`), KL on the shortlist, coverage
    (share of positions whose full-depth token is in the shortlist)."""
    agree, kl = [], []
    for a in range(0, len(h_e), batch):
        x, y = mx.array(h_e[a:a + batch]), mx.array(h_final[a:a + batch])
        z = head.logits(x)
        mine = head.ids[mx.argmax(z, axis=-1)]
        t = head.teacher_logits(y)
        logp = t - mx.logsumexp(t, axis=-1, keepdims=True)
        logq = z - mx.logsumexp(z, axis=-1, keepdims=True)
        k = (mx.exp(logp) * (logp - logq)).sum(-1)
        mx.eval(mine, k)
        agree.append(np.asarray(mine) == top1[a:a + batch])
        kl.append(np.asarray(k))
    cat = np.concatenate
    return {"top1_agree": float(cat(agree).mean()), "kl_shortlist": float(cat(kl).mean()),
            "coverage": float(np.isin(top1, head.ids_np).mean()), "positions": int(len(h_e))}


def top1_probability(z: mx.array) -> mx.array:
    """The softmax probability of each row's largest logit (a shortlist head's confidence)."""
    return mx.exp(mx.max(z, axis=-1) - mx.logsumexp(z, axis=-1))


def shortlist_top1(head, h: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A shortlist head's top-1 probability and token (a vocabulary id) at every row of `h`."""
    p1, tok = [], []
    for a in range(0, len(h), batch):
        z = head.logits(mx.array(h[a:a + batch]))
        p = top1_probability(z)
        t = head.ids[mx.argmax(z, axis=-1)]
        mx.eval(p, t)
        p1.append(np.asarray(p))
        tok.append(np.asarray(t))
    return np.concatenate(p1), np.concatenate(tok)


def confidence_curve(head: ExitHead, h_e: np.ndarray, top1: np.ndarray, taus, batch: int = 256) -> list[dict]:
    """For each threshold tau: the share of positions whose shortlist top-1 probability is >= tau,
    and the top-1 agreement with full depth among them (what a confidence-gated draft can expect)."""
    p1, tok = shortlist_top1(head, h_e, batch)
    agree = tok == top1
    out = []
    for t in taus:
        m = p1 >= t
        out.append({"tau": float(t), "share": float(m.mean()),
                    "acceptance": float(agree[m].mean()) if m.any() else None})
    return out
