"""Core ML export of the shallow heads, built with coremltools' MIL builder from the MLX weights.

Layout (Apple's recommendation for the Neural Engine, as in ml-ane-transformers): every tensor is
channels-first `(1, C, 1, S)` — S positions decided at once, S fixed at export — and every linear
map is a 1x1 convolution. Weights are stored fp16 and the program computes in fp16
(`compute_precision`), as the NE does. The modules themselves (controller, exit heads, depth
modules, the revive operation, the feature draft head) are written in agp/ane/modules.py.

Each package is written atomically (built beside its final path, then renamed) and carries
its provenance in the model's user metadata: `agp.module`, `agp.source_sha256` (sha256 of the
MLX weight files it was made from) and `agp.positions`. `read_back` loads a saved package's
MIL program (no Core ML runtime needed, so it works on Linux); `evaluate` runs that program's
ops in numpy (fp32 arithmetic on the stored fp16 weights) — the wiring check every platform
can do. Core ML's own numerics (and the Neural Engine) need macOS: `predict`.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agp import io
from agp.ane.modules import ModuleSpec
from agp.errors import AGPError

PACKAGE_VERSION = 1
FP16_MAX = 65504.0


def _coremltools():
    try:
        # coremltools warns once per missing macOS-only proxy on import; those are expected off macOS
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        import coremltools as ct
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types
    except ImportError as e:
        raise AGPError(f"Core ML export needs coremltools ({e}); install it with `./install.sh --dev` "
                       f"or `.venv/bin/pip install coremltools`") from None
    return ct, mb, types


def files_sha256(paths) -> str:
    """One sha256 over several files (the sha256 of their sha256s, in the order given)."""
    return io.sha256_bytes("".join(io.sha256_file(p) for p in paths).encode())


# --- build, save, read back -------------------------------------------------------------------------
def build_program(spec: ModuleSpec, positions: int):
    ct, mb, types = _coremltools()
    if list(spec.inputs) != ["x"]:
        # mb.program names a program's inputs after its function's parameters
        raise AGPError(f"module {spec.name}: the exporter builds one input named 'x', got {list(spec.inputs)}")

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, spec.inputs["x"], 1, positions), dtype=types.fp16)],
                opset_version=ct.target.iOS17)
    def prog(x):
        outs = spec.build(mb, {"x": x})
        return tuple(outs[o] for o in spec.outputs)

    return prog


def export(spec: ModuleSpec, out_dir: Path, positions: int) -> dict:
    """Write `<out_dir>/<name>.mlpackage` atomically; returns its manifest entry."""
    ct, _, _ = _coremltools()
    prog = build_program(spec, positions)
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    model.user_defined_metadata.update({"agp.module": spec.name, "agp.source_sha256": spec.source_sha256,
                                        "agp.positions": str(positions), "agp.version": str(PACKAGE_VERSION)})
    final = Path(out_dir) / f"{spec.name}.mlpackage"
    with io.atomic_dir(final) as tmp:
        model.save(str(tmp / "m.mlpackage"))
        for child in (tmp / "m.mlpackage").iterdir():
            child.rename(tmp / child.name)
        (tmp / "m.mlpackage").rmdir()
    files = sorted(p for p in final.rglob("*") if p.is_file())
    return {"package": final.name, "inputs": {n: [1, c, 1, positions] for n, c in spec.inputs.items()},
            "outputs": spec.outputs, "compute_precision": "float16", "weights": "float16",
            "source_sha256": spec.source_sha256, "bytes": int(sum(p.stat().st_size for p in files)),
            "package_sha256": files_sha256(files)}


@dataclass
class ReadBack:
    metadata: dict
    inputs: dict          # name -> shape
    outputs: list
    ops: list             # op types in program order (consts excluded)
    consts: dict          # const name -> numpy value
    program: object


def read_back(package: Path) -> ReadBack:
    """The saved package's MIL program, its declared shapes and its stored constants."""
    ct, _, _ = _coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
    package = Path(package)
    if not (package / "Manifest.json").exists():
        raise AGPError(f"{package} is not a Core ML package (no Manifest.json); rerun `agp export coreml`")
    try:
        model = ct.models.MLModel(str(package), skip_model_load=True)
        spec = model.get_spec()
        prog = load_milproto(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    except Exception as e:  # coremltools raises many types on a damaged package
        raise AGPError(f"{package} is unreadable ({type(e).__name__}: {str(e)[:120]}); rerun `agp export coreml`") from None
    fn = prog.functions["main"]
    consts = {op.outputs[0].name: op.outputs[0].val for op in fn.operations if op.op_type == "const"}
    return ReadBack(dict(spec.description.metadata.userDefined),
                    {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input},
                    [o.name for o in spec.description.output],
                    [op.op_type for op in fn.operations if op.op_type != "const"], consts, prog)


def check_provenance(rb: ReadBack, package: Path, source_sha256: str) -> None:
    """Refuse a package made from other weights than the head files it is paired with."""
    made_from = rb.metadata.get("agp.source_sha256")
    if made_from != source_sha256:
        raise AGPError(f"{package.name} was exported from other weights (source sha256 {str(made_from)[:12]}, "
                       f"the run's head files {source_sha256[:12]}); re-export with `agp export coreml --run RUN`")


def weight_parity(spec: ModuleSpec, rb: ReadBack) -> dict:
    """name -> True when the stored constant equals the fp16 layout-transformed MLX weight exactly."""
    out = {}
    for name, want in spec.weights.items():
        got = rb.consts.get(name)
        out[name] = got is not None and np.shape(got) == want.shape and np.array_equal(
            np.asarray(got, np.float16).view(np.uint16), want.view(np.uint16))
    return out


# --- numpy evaluation of a read-back program ----------------------------------------------------------
def _erf(x):
    from math import erf
    return np.vectorize(erf, otypes=[np.float64])(x)


def _gelu(x, mode):
    if mode == "EXACT":
        return 0.5 * x * (1 + _erf(x / np.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _conv1x1(x, weight, bias):
    y = np.einsum("oi,bihw->bohw", weight[:, :, 0, 0].astype(np.float64), x)
    return y if bias is None else y + bias.astype(np.float64).reshape(1, -1, 1, 1)


def _reduce(fn):
    return lambda a: fn(a["x"], axis=tuple(a["axes"]), keepdims=bool(a.get("keep_dims", False)))


def _lse(a):
    x, ax = a["x"], tuple(a["axes"])
    m = x.max(axis=ax, keepdims=True)
    out = m + np.log(np.exp(x - m).sum(axis=ax, keepdims=True))
    return out if a.get("keep_dims", False) else np.squeeze(out, ax)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _slice(a):
    if any(a.get(m) is not None and np.any(a[m]) for m in ("begin_mask", "end_mask", "squeeze_mask")):
        raise AGPError("the numpy evaluator reads slice_by_index without masks only")
    stride = a.get("stride")
    stride = [1] * len(a["begin"]) if stride is None else stride
    return a["x"][tuple(slice(int(b), int(e), int(s)) for b, e, s in zip(a["begin"], a["end"], stride))]


_OPS = {
    "add": lambda a: a["x"] + a["y"], "sub": lambda a: a["x"] - a["y"], "mul": lambda a: a["x"] * a["y"],
    "real_div": lambda a: a["x"] / a["y"], "exp": lambda a: np.exp(a["x"]),
    "rsqrt": lambda a: 1.0 / np.sqrt(a["x"] + a.get("epsilon", 1e-12)),
    "gelu": lambda a: _gelu(a["x"], a.get("mode", "EXACT")),
    "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a["x"])), "softmax": lambda a: _softmax(a["x"], int(a["axis"])),
    "reduce_sum": _reduce(np.sum), "reshape": lambda a: a["x"].reshape([int(d) for d in a["shape"]]),
    "slice_by_index": _slice, "concat": lambda a: np.concatenate(list(a["values"]), axis=int(a["axis"])),
    "conv": lambda a: _conv1x1(a["x"], a["weight"], a.get("bias")),
    "reduce_mean": _reduce(np.mean), "reduce_max": _reduce(np.max), "reduce_log_sum_exp": _lse,
    "reduce_argmax": lambda a: (np.expand_dims(a["x"].argmax(axis=int(a["axis"])), int(a["axis"]))
                                if a.get("keep_dims", False) else a["x"].argmax(axis=int(a["axis"]))),
}


def _as_float64(v):
    """Floating constants computed in float64; integer axes, strings and flags kept as they are."""
    if isinstance(v, (np.ndarray, np.floating)) and np.issubdtype(np.asarray(v).dtype, np.floating):
        return np.asarray(v, np.float64)
    return v


def evaluate(rb: ReadBack, feeds: dict, ranges: dict | None = None) -> dict:
    """Run the read-back program's ops in numpy (float64 arithmetic on the stored fp16 constants).
    Only the op types the exported modules use are known; any other is refused, never skipped.
    `ranges`, when given, receives every op output's largest magnitude: float64 cannot overflow,
    so this is how an fp16 overflow the device would hit is seen here."""
    fn = rb.program.functions["main"]
    env = {n: np.asarray(v, np.float64) for n, v in feeds.items()}
    for op in fn.operations:
        if op.op_type == "const":
            env[op.outputs[0].name] = _as_float64(op.outputs[0].val)
            continue
        if op.op_type not in _OPS:
            raise AGPError(f"the numpy evaluator does not know MIL op '{op.op_type}'")
        args = {k: _value(env, var) for k, var in op.inputs.items()}
        out = env[op.outputs[0].name] = np.asarray(_OPS[op.op_type](args))
        if ranges is not None and out.dtype.kind == "f" and out.size:
            ranges[op.outputs[0].name] = float(np.abs(out).max())
    return {o.name: env[o.name] for o in fn.outputs}


def _value(env: dict, var):
    """An op input: a computed variable, a constant, or a tuple of either (concat's values)."""
    if isinstance(var, (list, tuple)):
        return [_value(env, v) for v in var]
    return env[var.name] if var.name in env else _as_float64(var.val)


def fp16_overflows(ranges: dict) -> list:
    """Op outputs whose magnitude leaves fp16's range on the inputs evaluated."""
    return sorted(name for name, top in ranges.items() if not top <= FP16_MAX)


def to_channels_first(rows: np.ndarray) -> np.ndarray:
    """[S, C] rows -> the (1, C, 1, S) layout."""
    return np.asarray(rows).T[None, :, None, :]


def from_channels_first(t: np.ndarray) -> np.ndarray:
    """(1, C, 1, S) -> [S, C]; (1, 1, S) / (1, S) -> [S]."""
    t = np.asarray(t)
    return t[0, :, 0, :].T if t.ndim == 4 else t.reshape(-1)


MACOS_ONLY = "Core ML prediction needs macOS (coremltools has no Core ML runtime on this platform)"
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def load_model(package: Path, compute_units: str = "CPU_AND_NE"):
    """The package loaded for prediction on `compute_units` (macOS only; loading compiles it, so
    latency is timed on a loaded model)."""
    if platform.system() != "Darwin":
        raise AGPError(MACOS_ONLY)
    if compute_units not in COMPUTE_UNITS:
        raise AGPError(f"unknown compute units {compute_units!r}; choose from {', '.join(COMPUTE_UNITS)}")
    ct, _, _ = _coremltools()
    return ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, compute_units))


def predict(package: Path, feeds: dict, compute_units: str = "CPU_AND_NE", model=None) -> dict:
    """Core ML's own prediction (macOS only); `model` reuses a `load_model` result."""
    model = model or load_model(package, compute_units)
    return model.predict({k: np.asarray(v, np.float16) for k, v in feeds.items()})


_DEVICES = {"MLNeuralEngineComputeDevice": "ne", "MLGPUComputeDevice": "gpu", "MLCPUComputeDevice": "cpu"}


def placement(model, compute_units: str) -> dict:
    """{device: number of ops Core ML prefers to run there} from the compiled model's compute plan
    (MLComputePlan, macOS 14.4+). Counts ops, not their share of the work."""
    ct, _, _ = _coremltools()
    from coremltools.models.compute_plan import MLComputePlan
    try:
        plan = MLComputePlan.load_from_path(model.get_compiled_model_path(),
                                            compute_units=getattr(ct.ComputeUnit, compute_units))
    except Exception as e:  # older macOS: no compute plan API
        return {"unavailable": f"{type(e).__name__}: {str(e)[:80]}"}
    counts = {}
    for op in plan.model_structure.program.functions["main"].block.operations:
        if op.operator_name == "const":
            continue
        usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
        device = type(getattr(usage, "preferred_compute_device", None)).__name__ if usage else "unknown"
        key = _DEVICES.get(device, device)
        counts[key] = counts.get(key, 0) + 1
    return counts
