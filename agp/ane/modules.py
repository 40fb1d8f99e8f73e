"""The shallow modules AGP exports to Core ML, as MIL programs over the `(1, C, 1, S)` layout.

Each `*_spec` reads a trained MLX module and returns a `ModuleSpec`: its one input (channels),
its outputs, the constants it stores (fp16, in the package's layout, for the exact weight-parity
check) and a `build(mb, inputs)` that writes its ops with coremltools' MIL builder. Shared blocks
(`rms_norm`, `shortlist_outputs`, `depth_mixture`) are written once and reused by every module
that has them.

  controller   x (1, n_in, 1, S) -> route / vitality / earliest logits (1, K, 1, S)
               (x - mean) / std, conv + exact GELU trunk, one conv per task
  exit_L<E>    x (1, H, 1, S) -> logits (1, V, 1, S), top1 (1, 1, S) index into the shortlist,
               p1 (1, 1, S) its probability; residual translator, Gemma RMSNorm, shortlist rows
  depth_L<l>   x (1, k H, 1, S): the states after the module's k source blocks, source-major
               -> routed (1, H, 1, S), the state the stage-3 module adds to the residual stream
  revive_L<l>  the same input -> logits / top1 / p1: the deployed revive operation (depth module,
               tuned-lens translator, final norm, shortlist rows) that `revive_local` runs
  draft        x (1, 2H, 1, S) = [final state f_i, input embedding of x_{i+1}] -> state (1, H, 1, S),
               the predicted f_{i+1}, and logits / top1 / p1 of the token after it (EAGLE-style
               feature draft head: fusion conv, Gemma MLP block, shortlist head)

Two constants are stored folded, because coremltools' passes would fold them anyway and the
weight-parity check compares what is stored: a standardisation as `mean` and `inv_std = 1 / std`
(a multiply, not a divide), and Gemma's RMSNorm gain as `<norm>_gain = 1 + w`.

Gemma's residual states reach |h| ~ 3e4 (and a translator maps an early state to that final
scale), so their squares, and near the end the states themselves, leave fp16's range (max 65504):
every RMSNorm over a residual state, and every translator in front of one, works on h / 1024
instead (the same norm in exact arithmetic, since it is scale-free; eps scaled to match, which
underflows to 0 in fp16 and changes nothing measurable next to Gemma's state norms). The
translator's bias is stored / 1024 to match (exact: a power of two). The multiply goes *before*
a translator conv: after it, coremltools would fuse it into the conv weights, and W / 1024
would lose its small entries to fp16's subnormals.
The draft head's embedding input is of unit scale and is not prescaled: its squares are far from
overflow and would lose precision to fp16's subnormals if divided. Whether any intermediate leaves
fp16's range on real inputs is checked at export (`coreml.evaluate` records every op's range).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agp.errors import AGPError

RESIDUAL_PRESCALE = 1024.0     # power of two: exact in fp16; see the module docstring


@dataclass
class ModuleSpec:
    """One module to export: its name, inputs {name: channels}, and the MLX weights it reads,
    each as (name in the package, array in the package's layout) for the weight-parity check."""
    name: str
    inputs: dict
    outputs: list
    weights: dict = field(default_factory=dict)     # const name -> fp16 array as stored
    source_sha256: str = ""
    build: object = None                             # callable(mb, inputs dict) -> outputs dict


# --- layout --------------------------------------------------------------------------------------
def linear_as_conv(weight_out_in: np.ndarray) -> np.ndarray:
    """An `nn.Linear` weight [out, in] as a 1x1 conv weight [out, in, 1, 1] in fp16."""
    w = np.asarray(weight_out_in)
    if w.ndim != 2:
        raise AGPError(f"a linear weight must be 2-D, got shape {w.shape}")
    return w.astype(np.float16)[:, :, None, None]


def matmul_as_conv(w_in_out: np.ndarray) -> np.ndarray:
    """A matrix applied as `x @ W` (W [in, out]) as a 1x1 conv weight [out, in, 1, 1] in fp16."""
    return linear_as_conv(np.asarray(w_in_out).T)


def channels(vector: np.ndarray) -> np.ndarray:
    """A per-channel vector [C] as a (1, C, 1, 1) fp16 constant that broadcasts over (1, C, 1, S)."""
    return np.asarray(vector).astype(np.float16).reshape(1, -1, 1, 1)


def f16(vector) -> np.ndarray:
    return np.asarray(vector).astype(np.float16)


def inverse_std(std, what: str) -> np.ndarray:
    inv = 1.0 / np.asarray(std, np.float32)
    if not np.isfinite(inv.astype(np.float16)).all():
        raise AGPError(f"a {what} standard deviation is below fp16's range (1/std > 65504); it cannot run "
                       f"on the Neural Engine: retrain it on more varied positions")
    return inv


# --- shared blocks -----------------------------------------------------------------------------------
def conv(mb, x, w: dict, weight: str, bias: str | None = None, name: str | None = None):
    """A 1x1 convolution with stored constants `w[weight]` (and `w[bias]`)."""
    kw = {"bias": mb.const(val=w[bias], name=bias)} if bias else {}
    return mb.conv(x=x, weight=mb.const(val=w[weight], name=weight), name=name or f"{weight}_out", **kw)


def norm_weights(norm, prefix: str) -> dict:
    """Gemma RMSNorm's stored gain (1 + w) as a channel constant."""
    return {f"{prefix}_gain": channels(1.0 + np.asarray(norm.weight, np.float32))}


def rms_norm(mb, x, w: dict, prefix: str, eps: float, prescale: float):
    """Gemma's RMSNorm over the channel axis: x / rms(x) * (1 + w), squaring x / prescale."""
    y = x if prescale == 1.0 else mb.mul(x=x, y=np.float16(1.0 / prescale), name=f"{prefix}_prescaled")
    ms = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[1], keep_dims=True, name=f"{prefix}_mean_square")
    inv = mb.rsqrt(x=ms, epsilon=np.float16(eps / prescale ** 2), name=f"{prefix}_inv_rms")
    return mb.mul(x=mb.mul(x=y, y=inv), y=mb.const(val=w[f"{prefix}_gain"], name=f"{prefix}_gain"),
                  name=f"{prefix}_normed")


def shortlist_outputs(mb, normed, w: dict, bias: str | None):
    """Shortlist logits (rows [V, H] as a conv), the top-1 shortlist index and its probability."""
    logits = conv(mb, normed, w, "rows", bias, name="logits")
    top = mb.reduce_max(x=logits, axes=[1], keep_dims=False)
    lse = mb.reduce_log_sum_exp(x=logits, axes=[1], keep_dims=False)
    return {"logits": logits, "top1": mb.reduce_argmax(x=logits, axis=1, keep_dims=False, name="top1"),
            "p1": mb.exp(x=mb.sub(x=top, y=lse), name="p1")}


def channel_slice(mb, x, start: int, stop: int, positions: int, name: str):
    return mb.slice_by_index(x=x, begin=[0, start, 0, 0], end=[1, stop, 1, positions], name=name)


def shortlist_rows(rows) -> np.ndarray:
    return linear_as_conv(np.asarray(rows, np.float32))


# --- the modules --------------------------------------------------------------------------------------
def controller_spec(ctl, source_sha256: str) -> ModuleSpec:
    """The stage-2 controller (agp.heads.controller.Controller)."""
    from mlx.utils import tree_flatten
    p = {k: np.asarray(v) for k, v in tree_flatten(ctl.model.parameters())}
    tasks = list(ctl.n_out)
    w = {"mean": channels(ctl.mean), "inv_std": channels(inverse_std(ctl.std, "controller feature's")),
         "trunk_w": linear_as_conv(p["trunk.layers.0.weight"]), "trunk_b": f16(p["trunk.layers.0.bias"])}
    for t in tasks:
        w[f"{t}_w"] = linear_as_conv(p[f"heads.{t}.weight"])
        w[f"{t}_b"] = f16(p[f"heads.{t}.bias"])

    def build(mb, x):
        z = mb.mul(x=mb.sub(x=x["x"], y=mb.const(val=w["mean"], name="mean")),
                   y=mb.const(val=w["inv_std"], name="inv_std"), name="standardised")
        z = mb.gelu(x=conv(mb, z, w, "trunk_w", "trunk_b", name="trunk"), mode="EXACT", name="trunk_gelu")
        return {t: conv(mb, z, w, f"{t}_w", f"{t}_b", name=t) for t in tasks}

    return ModuleSpec("controller", {"x": ctl.n_in}, tasks, w, source_sha256, build)


def exit_spec(head, source_sha256: str) -> ModuleSpec:
    """A shortlist exit head (agp.heads.exit.ExitHead) with the backbone's final norm:
    h + h W + b on h / 1024 (the module docstring says why), RMSNorm, shortlist rows + bias."""
    par = head.params
    w = {"translator_w": matmul_as_conv(par.W), "translator_b": prescaled_bias(par.b), **norm_weights(head.norm, "norm"),
         "rows": shortlist_rows(head.rows), "row_bias": f16(par.bias)}
    eps = float(getattr(head.norm, "eps", 1e-6)) / RESIDUAL_PRESCALE ** 2

    def build(mb, x):
        h = prescale(mb, x["x"])
        t = mb.add(x=h, y=conv(mb, h, w, "translator_w", "translator_b"), name="translated")
        return shortlist_outputs(mb, rms_norm(mb, t, w, "norm", eps, 1.0), w, "row_bias")

    return ModuleSpec(f"exit_L{head.layer}", {"x": head.hidden}, ["logits", "top1", "p1"], w, source_sha256, build)


def prescaled_bias(b) -> np.ndarray:
    return f16(np.asarray(b, np.float32) / RESIDUAL_PRESCALE)


def prescale(mb, x, name: str = "prescaled"):
    return mb.mul(x=x, y=np.float16(1.0 / RESIDUAL_PRESCALE), name=name)


def depth_weights(module) -> dict:
    """The stage-3 depth module's constants (agp.heads.depth.DepthModule). Folded as coremltools
    would fold them: the standardisation (mean, 1/std), and the output scale sigma_l into the value
    map's last conv (v sigma_l = gelu(m Wd) (Wu sigma_l) + c sigma_l)."""
    p = module.params
    scale = module.std_np[module.me]
    return {"depth_mean": channels(module.mean_np.reshape(-1)),
            "depth_inv_std": channels(inverse_std(module.std_np.reshape(-1), "depth module source's")),
            "query_w": matmul_as_conv(p.q), "query_b": f16(p.q_b), "gate_w": matmul_as_conv(np.asarray(p.g)[:, None]),
            "gate_b": f16(p.g_b), "down_w": matmul_as_conv(p.down),
            "up_w": matmul_as_conv(np.asarray(p.up, np.float32) * scale[None, :]),
            "up_b": f16(np.asarray(p.c, np.float32) * scale)}


def depth_mixture(mb, x, w: dict, module, positions: int):
    """The depth module on x (1, k H, 1, S): softmax weights over the standardised sources from
    the current state, their mixture through the rank-r value map, the 2 sigmoid gate, added to
    the current state in residual units (sigma_l folded into the value map) (agp.heads.depth: h~ = h + g (v sigma_l))."""
    k, hidden, me = len(module.sources), module.hidden, module.me
    z = mb.mul(x=mb.sub(x=x, y=mb.const(val=w["depth_mean"], name="depth_mean")),
               y=mb.const(val=w["depth_inv_std"], name="depth_inv_std"), name="depth_standardised")
    current = channel_slice(mb, z, me * hidden, (me + 1) * hidden, positions, "depth_current")
    alpha = mb.softmax(x=conv(mb, current, w, "query_w", "query_b"), axis=1, name="depth_alpha")
    per_source = mb.reshape(x=z, shape=[1, k, hidden, positions], name="depth_sources")
    mixed = mb.reduce_sum(x=mb.mul(x=per_source, y=alpha), axes=[1], keep_dims=True)
    mixed = mb.reshape(x=mixed, shape=[1, hidden, 1, positions], name="depth_mixed")
    value = conv(mb, mb.gelu(x=conv(mb, mixed, w, "down_w"), mode="EXACT"), w, "up_w", "up_b")
    gate = mb.mul(x=mb.sigmoid(x=conv(mb, current, w, "gate_w", "gate_b")), y=np.float16(2.0), name="depth_gate")
    delta = mb.mul(x=gate, y=value, name="depth_delta")
    plain = channel_slice(mb, x, me * hidden, (me + 1) * hidden, positions, "depth_plain")
    return mb.add(x=plain, y=delta, name="routed")


def depth_spec(module, source_sha256: str, positions: int) -> ModuleSpec:
    """A stage-3 depth module alone: the routed state at its block."""
    w = depth_weights(module)
    return ModuleSpec(f"depth_L{module.layer}", {"x": len(module.sources) * module.hidden}, ["routed"], w,
                      source_sha256, lambda mb, x: {"routed": depth_mixture(mb, x["x"], w, module, positions)})


def revive_spec(reviver, source_sha256: str, positions: int) -> ModuleSpec:
    """The revive operation (agp.runtime.revive.Reviver): depth module, full-affine tuned-lens
    translator, the backbone's final norm and the shortlist rows (no bias)."""
    module, dec = reviver.module, reviver.decoder
    if dec.W is None:
        raise AGPError("the revive operation has no translator; rerun `agp run --stage depth`")
    w = {**depth_weights(module), "translator_w": matmul_as_conv(dec.W), "translator_b": prescaled_bias(dec.b),
         **norm_weights(dec.norm, "norm"), "rows": shortlist_rows(dec.rows)}
    eps = float(getattr(dec.norm, "eps", 1e-6)) / RESIDUAL_PRESCALE ** 2

    def build(mb, x):
        routed = depth_mixture(mb, x["x"], w, module, positions)
        t = conv(mb, prescale(mb, routed), w, "translator_w", "translator_b", name="translated")
        return shortlist_outputs(mb, rms_norm(mb, t, w, "norm", eps, 1.0), w, None)

    return ModuleSpec(f"revive_L{module.layer}", {"x": len(module.sources) * module.hidden},
                      ["logits", "top1", "p1"], w, source_sha256, build)


def draft_spec(head, source_sha256: str, positions: int) -> ModuleSpec:
    """The feature draft head (agp.heads.draft.FeatureDraftHead): [f_i, e(x_{i+1})] -> f_{i+1}
    and the shortlist distribution of the token after it."""
    p, hidden = head.params, head.hidden
    w = {**norm_weights(p.norm_f, "norm_f"), **norm_weights(p.norm_e, "norm_e"), **norm_weights(p.norm_m, "norm_m"),
         "fc_w": linear_as_conv(p.fc.weight), "fc_b": f16(p.fc.bias), "gate_proj": linear_as_conv(p.mlp.gate_proj.weight),
         "up_proj": linear_as_conv(p.mlp.up_proj.weight), "down_proj": linear_as_conv(p.mlp.down_proj.weight),
         **norm_weights(head.norm, "norm"), "rows": shortlist_rows(head.rows), "row_bias": f16(p.bias)}

    def build(mb, x):
        f = channel_slice(mb, x["x"], 0, hidden, positions, "feature")
        e = channel_slice(mb, x["x"], hidden, 2 * hidden, positions, "embedding")
        fused = mb.concat(values=[rms_norm(mb, f, w, "norm_f", p.norm_f.eps, RESIDUAL_PRESCALE),
                                  rms_norm(mb, e, w, "norm_e", p.norm_e.eps, 1.0)], axis=1, name="fused_in")
        fused = conv(mb, fused, w, "fc_w", "fc_b", name="fused")
        m = rms_norm(mb, fused, w, "norm_m", p.norm_m.eps, RESIDUAL_PRESCALE)
        act = mb.mul(x=mb.gelu(x=conv(mb, m, w, "gate_proj"), mode="TANH_APPROXIMATION"), y=conv(mb, m, w, "up_proj"))
        state = mb.add(x=fused, y=conv(mb, act, w, "down_proj"), name="next_state")
        eps = float(getattr(head.norm, "eps", 1e-6))
        return {"next_state": state, **shortlist_outputs(mb, rms_norm(mb, state, w, "norm", eps, RESIDUAL_PRESCALE),
                                                    w, "row_bias")}

    return ModuleSpec("draft", {"x": 2 * hidden}, ["next_state", "logits", "top1", "p1"], w, source_sha256, build)
