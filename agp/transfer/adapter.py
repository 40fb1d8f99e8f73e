"""The learned transfer adapter: a bottleneck between the sender's state at boundary b and the
resuming host's layers [b, L).

The sender encodes each state h [H] into a code c [w] (w < H), the code crosses the wire with a
raw codec (q8_0 by default) inside the same AGP-PTP packet, and the resuming host decodes it back
to a continuation-ready state before its layers run:

    x  = (h - mean) / std                         per-feature standardisation, fixed from training
                                                  states (Gemma's few huge-norm channels would
                                                  otherwise be all a bottleneck keeps)
    c  = x E + e                                   the code: what the packet carries
    x' = c D + d + gelu(c R) U                     a linear decoder plus a small residual map
    h' = x' * std + mean

Three modes (`MODES`), each a row of the rate-distortion table:
  hidden   step 0 is PCA of the standardised states (E, D the top-w principal directions, U = 0:
           the best linear code for the hidden loss), then `fit_hidden`: MSE of the standardised
           state + (1 - cosine) of the raw state.
  fisher   closed form, no steps (`TransferAdapter.fisher`): the best linear code in the metric
           F + alpha I, where F is the Fisher information of the resumed predictions with respect
           to the state, estimated from gradients of sum_i log p(y_i) with y_i drawn from the
           model's own next-token distributions (`fisher_rows`; every later position counts,
           through the KV). PCA spends the code on the directions with the most variance; this
           spends it on the directions the layers [b, L) and the head are sensitive to. With F = 0
           it is PCA.
  logit    from the fisher solution (from the hidden fit when there is no fisher pass), then
           `fit_logit`: the hidden loss plus KL(full depth || resumed) of the logits after the
           decoded span runs through the frozen layers [b, L) and the head (the teacher's top-k
           with its logsumexp and one bucket for the tail); the best validation step is kept.
The code crosses the wire with any raw codec: q8_0 (8 bits a value) or TurboQuant at fewer bits,
where a wider code fits the same bytes (measured: 256 values at 3 bits beat 96 at 8 bits at ~100
B). Training sees the wire's rounding through a straight-through estimator: q8_0 in MLX (rounding
of 32-value blocks to 8 bits on their absolute maximum); other codecs as a constant offset
computed with the codec itself before each logit step (`wire_offset`; the hidden fit of such a
code trains without the rounding). Attention-sink positions never enter the adapter: they
travel exactly (agp.transfer.resume.SINK_LIMIT).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from agp import io
from agp.config import ConfigMixin
from agp.errors import AGPError

FILE, META = "transfer_adapter.safetensors", "transfer_adapter.json"
MODES = ("hidden", "fisher", "logit")


def code_spec(entry, codec: str) -> tuple[int, str]:
    """(width, wire codec) of a `widths` entry: a width (sent with `codec`) or "<width>/<codec>"."""
    text = str(entry)
    width, _, own = text.partition("/")
    try:
        return int(width), (own or codec)
    except ValueError:
        raise AGPError(f"--transfer-adapter-widths takes widths or <width>/<codec> (e.g. 96,256/tq3), got {text!r}") from None


@dataclass
class AdapterArgs(ConfigMixin):
    # CI size: at the late boundary, two codes of ~100 B (the goal's budget) and one of ~300 B (tq4's bytes);
    # configs/real-size.yaml sweeps more and every boundary. Entries are "<width>" (sent with `codec`) or
    # "<width>/<codec>": q8_0 sends blocks of 32 values (34 B each), so 96 (~104 B) fits the 128 B goal and
    # 288 (~308 B) sits just under tq4; TurboQuant at 3 bits sends 256 values in ~100 B (a power of two:
    # other widths are padded to one before the rotation)
    widths: list = field(default_factory=lambda: [96, "256/tq3", 288])  # codes: <width> (sent with --transfer-adapter-codec) or <width>/<codec>
    # rows per code. CI leaves out `logit`: on the CI reference run its validation KL never went below the
    # Fisher code it starts from (step 0 kept at both ~100 B codes), for ~25 s per code
    modes: list = field(default_factory=lambda: ["hidden", "fisher"])  # rows per code: hidden, fisher, logit
    codec: str = "q8_0"             # raw codec of a width given without one
    fisher_samples: int = 2         # tokens drawn per position of each training span for the Fisher metric
    fisher_alpha: float = 1.0       # identity added to the Fisher metric (its mean eigenvalue is 1): at
                                    # width 256/tq3 on 8 held-out spans, 1.0 and 0.1 gave KL 0.236 / 0.260
                                    # from ~600 gradient rows, 0.221 / 0.221 from ~1200; PCA 0.272
    layers: list | None = None      # boundaries that get adapters; None: the late boundary B only
    rank: int = 64                  # width of the decoder's residual map
    steps: int = 200                # hidden-loss steps (minibatches of positions)
    batch: int = 256                # positions per hidden step
    logit_steps: int = 40           # logit-aware steps after the hidden ones (one span each)
    logit_positions: int = 16       # positions per span that pay the full 262K-row head in a logit step
    hidden_weight: float = 1.0      # weight of the hidden loss inside the logit-aware objective
    lr: float = 1e-3                # AdamW learning rate of the hidden steps
    logit_lr: float = 1e-4          # of the logit-aware steps (1e-3 undid the hidden fit: KL 0.56 -> 1.44 at width 96)
    eval_every: int = 20            # logit steps between validation KLs (the fit keeps its best step)
    weight_decay: float = 0.0       # AdamW weight decay
    seed: int = 0                   # initialisation, batch and position order

    def validate(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise AGPError(f"--transfer-adapter-modes takes {', '.join(MODES)}, got {self.modes}")
        if any(code_spec(w, self.codec)[0] < 1 for w in self.widths):   # also refuses a malformed entry
            raise AGPError(f"--transfer-adapter-widths must be positive, got {self.widths}")
        if self.fisher_alpha <= 0:
            raise AGPError(f"--transfer-adapter-fisher-alpha must be positive, got {self.fisher_alpha}")
        for name in ("steps", "batch", "logit_positions", "rank", "fisher_samples"):
            if getattr(self, name) < 1:
                raise AGPError(f"--transfer-adapter-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.logit_steps < 0:
            raise AGPError(f"--transfer-adapter-logit-steps must be >= 0, got {self.logit_steps}")


class AdapterParams(nn.Module):
    """The trainable part: encoder, decoder and the decoder's residual map (U starts at zero)."""

    def __init__(self, hidden: int, width: int, rank: int, seed: int = 0):
        super().__init__()
        self.enc = mx.zeros((hidden, width))
        self.enc_b = mx.zeros((width,))
        self.dec = mx.zeros((width, hidden))
        self.dec_b = mx.zeros((hidden,))
        self.down = mx.random.normal((width, rank), key=mx.random.key(seed)) * (width ** -0.5)
        self.up = mx.zeros((rank, hidden))


def q8_0_straight_through(c: mx.array) -> mx.array:
    """The code as q8_0 delivers it (blocks of 32 rounded to 8 bits on their absolute maximum),
    with the gradient of the identity. Widths that are not a multiple of 32 get a short last block,
    as the codec does."""
    n, w = c.shape
    pad = (-w) % 32
    blocks = mx.pad(c, [(0, 0), (0, pad)]).reshape(n, -1, 32)
    scale = mx.max(mx.abs(blocks), axis=-1, keepdims=True) / 127.0
    # as the codec: rounded on the float32 scale, decoded with the scale it stores in fp16
    q = mx.clip(mx.round(blocks * mx.where(scale > 0, 1.0 / scale, 0.0)), -127, 127)
    q = q * scale.astype(mx.float16).astype(mx.float32)
    q = q.reshape(n, -1)[:, :w]
    return c + mx.stop_gradient(q - c)


class TransferAdapter:
    """One adapter at one boundary: `encode(states)` -> codes, `decode(codes)` -> states (numpy in and out)."""

    def __init__(self, layer: int, mean: np.ndarray, std: np.ndarray, width: int, rank: int, mode: str,
                 codec: str = "q8_0", params: AdapterParams | None = None, seed: int = 0):
        self.layer, self.width, self.rank, self.mode, self.codec = int(layer), int(width), int(rank), mode, codec
        self.mean_np, self.std_np = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.hidden = self.mean_np.shape[-1]
        if not 0 < self.width < self.hidden:
            raise AGPError(f"a transfer adapter's width must lie in 1..{self.hidden - 1} (a bottleneck), got {self.width}")
        self.mean, self.std = mx.array(self.mean_np), mx.array(self.std_np)
        self.params = params or AdapterParams(self.hidden, self.width, self.rank, seed)

    @classmethod
    def pca(cls, layer: int, states: np.ndarray, width: int, rank: int, mode: str, codec: str = "q8_0",
            seed: int = 0) -> "TransferAdapter":
        """Step 0: standardisation from `states` [N, H] and the top-`width` principal directions."""
        mean, std = states.mean(0), states.std(0) + 1e-3
        basis = _top_directions((states - mean) / std, width)             # [H, w]
        return cls._linear(layer, mean, std, basis, basis.T, rank, mode, codec, seed)

    @classmethod
    def fisher(cls, layer: int, states: np.ndarray, grads: np.ndarray, width: int, rank: int, mode: str,
               alpha: float = 1.0, codec: str = "q8_0", seed: int = 0) -> "TransferAdapter":
        """The linear code minimising E (x - x')^T (F + alpha I) (x - x') over standardised states x
        (from `states` [N, H]), with F the Fisher metric from `grads` [M, H] (gradients with
        respect to the raw states, `fisher_rows`) scaled to mean eigenvalue 1: PCA of M x with
        M = (F + alpha I)^(1/2), encoder M U, decoder U^T M^-1."""
        mean, std = states.mean(0), states.std(0) + 1e-3
        g = grads.astype(np.float64) * std                                 # gradient w.r.t. x
        f = g.T @ g / max(len(g), 1)
        f = f / max(np.trace(f) / len(f), 1e-30)
        lam, q = np.linalg.eigh(f)
        lam = np.maximum(lam, 0.0) + alpha
        root, inv_root = (q * np.sqrt(lam)) @ q.T, (q / np.sqrt(lam)) @ q.T
        u = _top_directions(((states - mean) / std) @ root, width)
        return cls._linear(layer, mean, std, root @ u, u.T @ inv_root, rank, mode, codec, seed)

    @classmethod
    def _linear(cls, layer, mean, std, enc, dec, rank, mode, codec, seed) -> "TransferAdapter":
        a = cls(layer, mean, std, enc.shape[1], rank, mode, codec, seed=seed)
        a.params.enc, a.params.dec = mx.array(enc.astype(np.float32)), mx.array(dec.astype(np.float32))
        return a

    # --- the maps ---------------------------------------------------------------------------
    def code(self, h: mx.array) -> mx.array:
        return ((h.astype(mx.float32) - self.mean) / self.std) @ self.params.enc + self.params.enc_b

    def state(self, c: mx.array) -> mx.array:
        p = self.params
        x = c @ p.dec + p.dec_b + nn.gelu(c @ p.down) @ p.up
        return x * self.std + self.mean

    def roundtrip(self, h: mx.array, offset: mx.array | None = None) -> mx.array:
        """What the resuming host gets for `h` [N, H], with the wire codec's rounding (training):
        q8_0's in MLX, another codec's as the constant `offset` (`wire_offset`), else none."""
        c = self.code(h)
        if self.codec == "q8_0":
            c = q8_0_straight_through(c)
        elif offset is not None:
            c = c + mx.stop_gradient(offset)
        return self.state(c)

    def wire_offset(self, states: np.ndarray, sink: np.ndarray) -> mx.array:
        """The wire codec's rounding (decoded - sent) of these states' codes at the current
        parameters; zero on the attention sinks, which travel exactly."""
        from agp.quant.registry import make_codec
        c = self.encode(np.where(sink[:, None], self.mean_np, states))
        codec = make_codec(self.codec, self.width)
        return mx.array(np.where(sink[:, None], 0.0, np.asarray(codec.decode(codec.encode(c))) - c).astype(np.float32))

    def encode(self, states: np.ndarray) -> np.ndarray:
        c = self.code(mx.array(states))
        mx.eval(c)
        return np.asarray(c)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        h = self.state(mx.array(np.asarray(codes, np.float32)))
        mx.eval(h)
        return np.asarray(h)

    def macs(self) -> int:
        """Per state: standardise, encode (sender); decode with the residual map, unstandardise (receiver)."""
        h, w, r = self.hidden, self.width, self.rank
        return 2 * h + h * w + w * h + w * r + r * h + 2 * h

    @property
    def name(self) -> str:
        return f"ta{self.width}-{self.mode}/{self.codec}"

    # --- files ----------------------------------------------------------------------------
    def save(self, d: Path, meta: dict) -> None:
        d = Path(d)
        w = dict(tree_flatten(self.params.parameters()))
        io.write_safetensors(d / FILE, {**w, "mean": mx.array(self.mean_np), "std": mx.array(self.std_np)})
        io.write_json(d / META, {**meta, "layer": self.layer, "width": self.width, "rank": self.rank,
                                 "mode": self.mode, "codec": self.codec})

    @classmethod
    def load(cls, d: Path, fingerprint: str) -> tuple["TransferAdapter", dict]:
        """The adapter saved in `d`, refused when it was trained for another model or is corrupt."""
        fix = "rerun `agp run --stage transfer`"
        meta, w = io.read_trained_module(d, FILE, META, fingerprint, "transfer adapter", fix)
        mean, std = np.asarray(w.pop("mean")), np.asarray(w.pop("std"))
        params = AdapterParams(mean.shape[-1], int(meta["width"]), int(meta["rank"]))
        try:
            params.load_weights(list(w.items()))
        except ValueError as e:
            raise AGPError(f"transfer adapter at {d} does not match its own description ({e}); {fix}") from None
        return cls(int(meta["layer"]), mean, std, int(meta["width"]), int(meta["rank"]), meta["mode"],
                   meta["codec"], params), meta


def _top_directions(x: np.ndarray, width: int) -> np.ndarray:
    """The top-`width` right singular vectors of x [N, H] as columns [H, w]."""
    _, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    if len(vt) < width:
        raise AGPError(f"a width-{width} transfer adapter needs at least {width} training states, got {len(x)}; "
                       f"raise --transfer-pool-prompts or lower --transfer-adapter-widths")
    return vt[:width].T


# --- training ---------------------------------------------------------------------------------
def fisher_rows(bb, layer: int, spans: list, samples: int, seed: int = 0, progress=None) -> np.ndarray:
    """Per non-sink position of each span, `samples` gradients with respect to the states at b of
    sum_i log p(y_i | resumed), y_i drawn from the model's own next-token distribution after the
    span runs layers [b, L) and the head. Their second moment is the Fisher information of the
    resumed predictions (`TransferAdapter.fisher`); a position's row includes its effect on every
    later position through the KV."""
    def logits(h):
        return bb.head(bb.run_layers(h[None], layer, bb.n_layers))[0].astype(mx.float32)

    def logp(h, y):
        z = logits(h)
        return mx.take_along_axis(z - mx.logsumexp(z, axis=-1, keepdims=True), y[:, None], axis=-1).sum()

    grad, rows = mx.grad(logp), []
    for i, s in enumerate(spans):
        h = mx.array(s.states)
        z = logits(h)
        for k in range(samples):
            g = grad(h, mx.random.categorical(z, key=mx.random.key(seed * 1_000_003 + i * samples + k)))
            mx.eval(g)
            rows.append(np.asarray(g)[~s.sink])
        if progress is not None:
            progress.update(1)
    return np.concatenate(rows) if rows else np.zeros((0, bb.hidden_size), np.float32)


def hidden_loss(a: TransferAdapter, h: mx.array) -> mx.array:
    got = a.roundtrip(h)
    mse = (((got - h) / a.std) ** 2).mean()
    cos = (got * h).sum(-1) / (mx.linalg.norm(got, axis=-1) * mx.linalg.norm(h, axis=-1) + 1e-6)
    return mse + (1.0 - cos).mean()


def fit_hidden(a: TransferAdapter, states: np.ndarray, args: AdapterArgs, progress=None) -> list[dict]:
    """`args.steps` minibatch steps of the hidden loss on `states` [N, H] (sinks excluded by the caller)."""
    from agp.heads.fit import fit_minibatches

    def loss(h):
        return hidden_loss(a, h)

    return fit_minibatches(a.params, loss, (mx.array(states),), args, "the transfer adapter (hidden loss)",
                           "lower --transfer-adapter-lr", progress)


@dataclass
class Span:
    """One training prompt at the boundary: its states [n, H], which positions are sinks, and the
    teacher's top-k ids, logits and logsumexp per position."""
    states: np.ndarray
    sink: np.ndarray
    topk_ids: np.ndarray
    topk_logits: np.ndarray
    lse: np.ndarray


def span_kl(bb, a: TransferAdapter, s: Span, rows: mx.array, offset: mx.array | None = None) -> mx.array:
    """Mean KL(teacher || resumed) at positions `rows` after the decoded span runs layers [b, L), on
    the teacher's top k and one bucket for the rest of the vocabulary (a lower bound of the exact KL).
    `offset`: the wire's rounding of a codec without an MLX form (`TransferAdapter.wire_offset`)."""
    h = mx.array(s.states)
    sink = mx.array(s.sink)[:, None]
    got = mx.where(sink, h, a.roundtrip(h, offset))            # sinks travel exactly
    out = bb.run_layers(got[None], a.layer, bb.n_layers)[0]
    z = bb.head(out[rows][None])[0].astype(mx.float32)
    logq = z - mx.logsumexp(z, axis=-1, keepdims=True)
    t = mx.array(s.topk_logits)[rows]
    logp = t - mx.array(s.lse)[rows][:, None]
    q = mx.take_along_axis(logq, mx.array(s.topk_ids)[rows], axis=-1)
    # the teacher's mass outside its top k as one bucket: without it the fit may pile the tail's mass
    # on a few tokens, which the top-k terms do not see and the exact KL does (measured: top-k KL
    # 0.51 -> 0.41 on held-out while the exact KL rose 0.56 -> 0.63)
    p = mx.exp(logp)
    p_tail = mx.maximum(1.0 - p.sum(-1), 1e-9)
    q_tail = mx.maximum(1.0 - mx.exp(q).sum(-1), 1e-9)
    return ((p * (logp - q)).sum(-1) + p_tail * (mx.log(p_tail) - mx.log(q_tail))).mean()


def span_offset(a: TransferAdapter, s: Span) -> mx.array | None:
    return None if a.codec == "q8_0" else a.wire_offset(s.states, s.sink)


def valid_kl(bb, a: TransferAdapter, spans: list[Span]) -> float:
    """Mean KL over every position of the validation spans."""
    vals = [span_kl(bb, a, s, mx.arange(len(s.states)), span_offset(a, s)) for s in spans]
    mx.eval(vals)
    return float(np.mean([v.item() for v in vals]))


def fit_logit(bb, a: TransferAdapter, spans: list[Span], args: AdapterArgs, progress=None,
              valid: list[Span] | None = None) -> list[dict]:
    """`args.logit_steps` steps, one span each, of KL through the frozen layers [b, L) and the head
    plus `hidden_weight` times the hidden loss of the span's non-sink states. With `valid` spans the
    parameters of the step with the lowest validation KL are kept (step 0, the hidden fit, included):
    a few training spans overfit quickly."""
    import mlx.optimizers as optim
    from mlx.utils import tree_map
    opt = optim.AdamW(learning_rate=args.logit_lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed + 1)
    hist, best = [], None

    def loss(s, rows, plain, offset):
        kl = span_kl(bb, a, s, rows, offset)
        return kl + args.hidden_weight * hidden_loss(a, plain), kl

    def checkpoint(i):
        nonlocal best
        if valid:
            v = valid_kl(bb, a, valid)
            hist.append({"step": i, "valid_kl": v})
            if best is None or v < best[0]:
                best = (v, i, tree_map(lambda x: mx.array(x), a.params.parameters()))

    step = nn.value_and_grad(a.params, lambda *x: loss(*x))
    checkpoint(0)
    for i in range(1, args.logit_steps + 1):
        s = spans[rng.integers(len(spans))]
        pick = rng.choice(len(s.states), size=min(args.logit_positions, len(s.states)), replace=False)
        (total, kl), grads = step(s, mx.array(np.sort(pick)), mx.array(s.states[~s.sink]), span_offset(a, s))
        opt.update(a.params, grads)
        mx.eval(a.params.parameters(), opt.state, total, kl)
        if not np.isfinite(total.item()):
            raise AGPError(f"the transfer adapter (logit-aware) diverged at step {i} (loss {total.item()}); "
                           f"lower --transfer-adapter-logit-lr")
        if progress is not None:
            progress.update(1)
        hist.append({"step": i, "loss": float(total.item()), "kl": float(kl.item())})
        if i % args.eval_every == 0 or i == args.logit_steps:
            checkpoint(i)
    if best is not None:
        a.params.update(best[2])
        hist.append({"kept_step": best[1], "valid_kl": best[0]})
    return hist
