"""Depth-routing residual module: a token-conditioned mixture over earlier layers' states, added
to the residual stream at one candidate block l, trained by distillation from full depth.

At block l the module reads the current state x = h_l and the states after the source blocks
j in S (by default every earlier block and l itself). Each state is standardised per feature with
statistics fixed from the training positions (Gemma's few huge-norm channels would otherwise
decide every mixture). Then:

    alpha = softmax(x^ Wq + bq)                      token-conditioned weights over the sources
    m     = sum_j alpha_j s^_j                       the mixture of standardised states
    v     = gelu(m Wd) Wu + c                        a small value map (rank r)
    g     = 2 sigmoid(x^ wg + bg)                    a scalar gate from the current state
    h~_l  = h_l + g * (v * sigma_l)                  back in residual units, added to the stream

Wu = c = 0 at initialisation, so h~_l = h_l exactly (the tuned-lens trick of zero-initialised
translators): step 0 is the plain residual path. The module is decoded through a frozen decoder
(optionally a tuned-lens translator, then the backbone's final norm and the tied embedding rows),
the base model is frozen, and the loss is KL(full-depth teacher || routed path) on the shortlist
rows the runtime's exit heads use, plus an optional hidden-state cosine term.
"""
from __future__ import annotations

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

FILE, META = "depth_module.safetensors", "depth_module.json"


@dataclass
class DepthArgs(ConfigMixin):
    rank: int = 64                # width r of the value map
    steps: int = 150              # distillation steps per module (CI size; configs/real-size.yaml: 600)
    batch: int = 128              # positions per step
    lr: float = 1e-3              # AdamW learning rate
    weight_decay: float = 1e-2    # AdamW weight decay
    hidden_weight: float = 0.0    # weight of the 1 - cos(translated routed state, final state) term
    seed: int = 0                 # initialisation and batch order


class DepthParams(nn.Module):
    """The trainable part: query, gate, value map (Wu and c start at zero: identity)."""

    def __init__(self, hidden: int, k: int, rank: int, seed: int = 0):
        super().__init__()
        key = mx.random.key(seed)
        self.q = mx.zeros((hidden, k))
        self.q_b = mx.zeros((k,))
        self.g = mx.zeros((hidden,))
        self.g_b = mx.zeros((1,))
        self.down = mx.random.normal((hidden, rank), key=key) * (hidden ** -0.5)
        self.up = mx.zeros((rank, hidden))
        self.c = mx.zeros((hidden,))


class DepthModule:
    """The module at one block: `apply(states)` -> routed state; `states` maps block -> [N, H]."""

    def __init__(self, layer: int, sources: list[int], mean: np.ndarray, std: np.ndarray, rank: int,
                 params: DepthParams | None = None, seed: int = 0):
        self.layer, self.sources, self.rank = int(layer), [int(s) for s in sources], int(rank)
        if self.layer not in self.sources or any(s > self.layer or s < 0 for s in self.sources):
            raise AGPError(f"depth module at block {self.layer} needs sources within 0..{self.layer} "
                           f"including {self.layer}, got {self.sources}")
        self.mean_np, self.std_np = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if self.mean_np.shape != (len(self.sources), self.mean_np.shape[-1]) or self.std_np.shape != self.mean_np.shape:
            raise AGPError(f"depth module statistics must be [{len(self.sources)}, hidden], got "
                           f"{self.mean_np.shape} and {self.std_np.shape}")
        self.hidden = self.mean_np.shape[1]
        self.mean, self.std = mx.array(self.mean_np), mx.array(self.std_np)
        self.me = self.sources.index(self.layer)
        self.params = params or DepthParams(self.hidden, len(self.sources), self.rank, seed)

    @classmethod
    def identity(cls, layer: int, sources: list[int], states: dict, rank: int, seed: int = 0) -> "DepthModule":
        """A fresh module whose standardisation comes from `states` (block -> [N, H] numpy)."""
        mean = np.stack([states[s].mean(0) for s in sources]).astype(np.float32)
        std = np.stack([states[s].std(0) + 1e-3 for s in sources]).astype(np.float32)
        return cls(layer, sources, mean, std, rank, seed=seed)

    def stack(self, states: dict) -> mx.array:
        """[N, k, H] standardised source states (from numpy or mlx arrays)."""
        missing = [s for s in self.sources if s not in states]
        if missing:
            raise AGPError(f"depth module at block {self.layer} needs the states after blocks {missing}")
        s = mx.stack([mx.array(states[j]) if not isinstance(states[j], mx.array) else states[j]
                      for j in self.sources], axis=-2).astype(mx.float32)
        return (s - self.mean) / self.std

    def apply_stacked(self, x: mx.array, z: mx.array) -> mx.array:
        """Routed state from the plain state x [N, H] and the standardised sources z [N, k, H]."""
        p = self.params
        xs = z[..., self.me, :]
        alpha = mx.softmax(xs @ p.q + p.q_b, axis=-1)
        m = (alpha[..., None] * z).sum(-2)
        v = nn.gelu(m @ p.down) @ p.up + p.c
        g = 2 * mx.sigmoid(xs @ p.g + p.g_b)
        return x + g[..., None] * (v * self.std[self.me])

    def apply(self, states: dict) -> mx.array:
        x = states[self.layer]
        x = (mx.array(x) if not isinstance(x, mx.array) else x).astype(mx.float32)
        return self.apply_stacked(x, self.stack(states))

    def weights(self, states: dict) -> np.ndarray:
        """The mixture weights alpha [N, k] (what the module reads from each source)."""
        z = self.stack(states)
        a = mx.softmax(z[..., self.me, :] @ self.params.q + self.params.q_b, axis=-1)
        mx.eval(a)
        return np.asarray(a)

    def macs(self) -> int:
        """Per token: query, standardising and mixing k states, value map, gate, output scale."""
        k, h, r = len(self.sources), self.hidden, self.rank
        return h * k + 2 * k * h + 2 * h * r + h + 2 * h

    # --- files ----------------------------------------------------------------------------
    def save(self, d: Path, meta: dict) -> None:
        d = Path(d)
        w = dict(tree_flatten(self.params.parameters()))
        io.write_safetensors(d / FILE, {**w, "mean": mx.array(self.mean_np), "std": mx.array(self.std_np)})
        io.write_json(d / META, {**meta, "layer": self.layer, "sources": self.sources, "rank": self.rank})

    @classmethod
    def load(cls, d: Path, fingerprint: str, layer: int | None = None) -> tuple["DepthModule", dict]:
        """The module saved in `d`, refused when it was trained for another model or block, or is corrupt."""
        meta, w = io.read_trained_module(d, FILE, META, fingerprint, "depth module", "rerun `agp run --stage depth`")
        if layer is not None and int(meta.get("layer", -1)) != int(layer):
            raise AGPError(f"the depth module at {d} is for block {meta.get('layer')}, but block {layer} was "
                           f"asked for; rerun `agp run --stage depth` with {layer} among --depth-layers")
        mean, std = np.asarray(w.pop("mean")), np.asarray(w.pop("std"))
        params = DepthParams(mean.shape[1], len(meta["sources"]), int(meta["rank"]))
        try:
            params.load_weights(list(w.items()))
        except ValueError as e:
            raise AGPError(f"depth module at {d} does not match its own description ({e}); "
                           f"rerun `agp run --stage depth`") from None
        return cls(int(meta["layer"]), meta["sources"], mean, std, int(meta["rank"]), params), meta


class Decoder:
    """Frozen decoding of a state at block l: optional translator (W full, b), final norm, rows.

    `rows` are embedding rows (the shortlist for training and the revive emission; all rows for
    the vocabulary-wide evaluation). The teacher is the same norm and rows on the final state."""

    def __init__(self, bb, rows_ids: np.ndarray | None, translator=None):
        self.norm = bb.model.model.norm
        emb = bb.model.model.embed_tokens
        if not hasattr(emb, "weight") or emb.weight.shape[0] != bb.vocab_size:
            raise AGPError("the depth module's decoder needs tied, unquantised embeddings (Gemma 3 layout)")
        self.ids_np = None if rows_ids is None else np.asarray(rows_ids, np.int32)
        self.rows = emb.weight if rows_ids is None else emb.weight[mx.array(self.ids_np)].astype(mx.float32)
        self.W = None if translator is None or translator.W is None else mx.array(translator.W)
        self.b = None if self.W is None else mx.array(translator.b)
        mx.eval(self.rows)

    def translate(self, h: mx.array) -> mx.array:
        return h if self.W is None else h @ self.W + self.b

    def logits(self, h: mx.array) -> mx.array:
        return self.norm(self.translate(h)) @ self.rows.T

    def teacher(self, h_final: mx.array) -> mx.array:
        return self.norm(h_final) @ self.rows.T

    def macs(self) -> int:
        h = self.rows.shape[1]
        return (0 if self.W is None else h * h) + self.rows.shape[0] * h


def _kl(t: mx.array, z: mx.array) -> mx.array:
    logp = t - mx.logsumexp(t, axis=-1, keepdims=True)
    logq = z - mx.logsumexp(z, axis=-1, keepdims=True)
    return (mx.exp(logp) * (logp - logq)).sum(-1)


def distill(module: DepthModule, decoder: Decoder, states: dict, final: np.ndarray, args: DepthArgs,
            progress=None) -> dict:
    """Minimise KL(teacher on the decoder's rows || decoder(module(states))) over the positions
    given (+ hidden_weight x (1 - cosine to the final state)); the backbone stays frozen."""
    Z = module.stack(states)
    X = mx.array(states[module.layer]).astype(mx.float32)
    Y = mx.array(final).astype(mx.float32)
    T = decoder.teacher(Y)
    mx.eval(Z, X, T)

    def loss_fn(params, z, x, t, y):
        module.params = params
        h = module.apply_stacked(x, z)
        loss = _kl(t, decoder.logits(h)).mean()
        if args.hidden_weight:
            hh = decoder.translate(h)
            cos = (hh * y).sum(-1) / (mx.linalg.norm(hh, axis=-1) * mx.linalg.norm(y, axis=-1) + 1e-6)
            loss = loss + args.hidden_weight * (1 - cos).mean()
        return loss

    params = module.params
    hist = fit_minibatches(params, lambda z, x, t, y: loss_fn(params, z, x, t, y), (Z, X, T, Y), args,
                           "depth-module distillation", "lower --depth-module-lr", progress)
    module.params = params
    return {"history": hist}


def routed_states(module: DepthModule, states: dict, batch: int = 512) -> np.ndarray:
    """The module's output [N, H] for every position (numpy), in batches."""
    n = len(states[module.layer])
    out = []
    for a in range(0, n, batch):
        h = module.apply({s: states[s][a:a + batch] for s in module.sources})
        mx.eval(h)
        out.append(np.asarray(h))
    return np.concatenate(out)


def uniform_mix(states: dict, layer: int, sources: list[int]) -> np.ndarray:
    """Naive depth mixing: the plain average of the source states, rescaled per position to the
    norm of h_l (the final norm would undo a global scale anyway, but not Gemma's per-layer growth)."""
    m = np.mean([states[s] for s in sources], axis=0)
    x = states[layer]
    return m * (np.linalg.norm(x, axis=-1, keepdims=True) / (np.linalg.norm(m, axis=-1, keepdims=True) + 1e-6))
