"""`agp export coreml`: export a run's landed shallow heads and check every package on this platform.

Steps: find the heads the run has (`available`), build each module's spec from the saved MLX
weights, write the packages into `<run>/ane/`, read each back and check it (`check`): structure
(declared input/output shapes, op types), weight parity (every stored constant equals the fp16
layout-transformed MLX weight bit for bit) and wiring parity (the read-back program evaluated in
numpy against the MLX module on real held-out inputs). The record goes into `ane/export.json`
and the run manifest's `exports.coreml`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agp import io
from agp.ane import coreml, modules
from agp.errors import AGPError

HEADS = ("controller", "exit", "depth", "revive", "draft")
HELDOUT_TEXT = ("The garbage collector frees objects that are no longer reachable. When a reference "
                "cycle is found, every object in it is examined before the memory is returned. ")


@dataclass
class Source:
    """One exportable head of a run: what to build and which files it came from."""
    kind: str
    path: Path
    files: list

    def sha256(self) -> str:
        return coreml.files_sha256(self.files)


def available(run_dir: Path, wanted=None) -> list[Source]:
    """The heads the run holds. Asked for by name, a head whose stage has not produced it is refused
    with the stage to run; by default every head the run has is exported (the controller and the
    exit heads are required, the depth stage's modules and the feature draft head are optional)."""
    run_dir = Path(run_dir)
    explicit = wanted is not None
    wanted = list(HEADS) if wanted is None else list(wanted)
    unknown = [w for w in wanted if w not in HEADS]
    if unknown:
        raise AGPError(f"unknown head(s) {unknown}; choose from {', '.join(HEADS)}")
    out = []
    for kind in wanted:
        found = _FINDERS[kind](run_dir)
        if not found and (explicit or kind in ("controller", "exit")):
            raise AGPError(f"run {run_dir} has no {_WHAT[kind][0]}; run `agp run --stage {_WHAT[kind][1]}` first")
        out += found
    return out


def _controller_source(run_dir: Path) -> list[Source]:
    d = run_dir / "controller" / "heads"
    return [Source("controller", d, [d / "heads.safetensors", d / "norm.npz", d / "heads.json"])] \
        if (d / "heads.json").exists() else []


def _exit_sources(run_dir: Path) -> list[Source]:
    dirs = sorted((run_dir / "runtime" / "exit_heads").glob("L*"), key=lambda p: int(p.name[1:]))
    return [Source("exit", d, [d / "exit_head.safetensors", d / "exit_head.json"]) for d in dirs]


def _depth_sources(run_dir: Path) -> list[Source]:
    from agp.heads.depth import FILE, META
    dirs = sorted((run_dir / "depth" / "modules").glob("L*"), key=lambda p: int(p.name[1:]))
    return [Source("depth", d, [d / FILE, d / META]) for d in dirs if (d / META).exists()]


def _revive_source(run_dir: Path) -> list[Source]:
    from agp.heads.depth import FILE
    from agp.runtime.revive import META, TRANSLATOR
    d = run_dir / "depth" / "revive"
    return [Source("revive", d, [d / FILE, d / TRANSLATOR, d / META])] if (d / META).exists() else []


def _draft_source(run_dir: Path) -> list[Source]:
    meta = run_dir / "runtime" / "runtime.json"
    name = json.loads(meta.read_text()).get("feature_draft") if meta.exists() else None
    d = run_dir / "runtime" / str(name)
    return [Source("draft", d, [d / "draft_head.safetensors", d / "draft_head.json"])] \
        if name and (d / "draft_head.json").exists() else []


_WHAT = {"controller": ("controller heads", "controller"), "exit": ("exit heads", "runtime"),
         "depth": ("depth modules", "depth"), "revive": ("revive operation", "depth"),
         "draft": ("feature draft head", "runtime")}


def held_out_features(run_dir: Path, n: int) -> np.ndarray:
    """The controller's held-out feature rows (what the exported controller will be fed)."""
    path = Path(run_dir) / "controller" / "features.npz"
    if not path.exists():
        raise AGPError(f"no controller features at {path}; run `agp run --stage controller`")
    z = np.load(path)
    held = z["split"] == "heldout"
    rows = z["features"][held] if held.any() else z["features"]
    return rows[:n].astype(np.float32)


def held_out_tokens(bb, n: int) -> list[int]:
    """n + 2 token ids of a fixed text outside the lanes (a state, the token after it, and BOS)."""
    ids = bb.encode(HELDOUT_TEXT * 16, max_tokens=n + 2, truncate=True)
    if len(ids) < n + 2:
        raise AGPError(f"--positions {n} is more than the held-out text gives ({len(ids) - 2}); use fewer positions")
    return ids


def held_out_states(bb, layers, n: int) -> dict:
    """{layer: hidden states [n, H] after `layer` blocks} on a fixed text outside the lanes."""
    import mlx.core as mx
    ids = held_out_tokens(bb, n)[: n + 1]
    _, got = bb.capture(mx.array(ids), sorted(set(layers)))
    return {layer: np.asarray(got[layer][0, -n:]).astype(np.float32) for layer in got}


def source_rows(states: dict, sources) -> np.ndarray:
    """The depth module's input rows [n, k H]: the source states side by side, source-major."""
    return np.concatenate([states[s] for s in sources], axis=1)


@dataclass
class Loaded:
    """One head ready to export and compare: its spec, held-out input rows {name: [S, C]}, and
    the MLX module as `forward(rows) -> {output: [S, ...] numpy}` (also what latency is timed on)."""
    spec: modules.ModuleSpec
    inputs: dict
    forward: object

    def reference(self) -> dict:
        return self.forward(self.inputs)


def load_module(src: Source, bb, run_dir: Path, positions: int) -> Loaded:
    return _LOADERS[src.kind](src, bb, run_dir, positions)


def _mx(rows):
    import mlx.core as mx
    return mx.array(rows)


def _controller(src, bb, run_dir, positions):
    from agp.heads.controller import Controller
    ctl = Controller.load(src.path)
    return Loaded(modules.controller_spec(ctl, src.sha256()), {"x": held_out_features(run_dir, positions)},
                  lambda rows: ctl.logits(rows["x"]))


def _exit(src, bb, run_dir, positions):
    from agp.heads.exit import ExitHead
    head, _ = ExitHead.load(bb, src.path)
    h = held_out_states(bb, [head.layer], positions)[head.layer]
    return Loaded(modules.exit_spec(head, src.sha256()), {"x": h},
                  lambda rows: shortlist_outputs(head.logits(_mx(rows["x"]))))


def _depth(src, bb, run_dir, positions):
    from agp.heads.depth import DepthModule
    module, _ = DepthModule.load(src.path, bb.fingerprint)
    states = held_out_states(bb, module.sources, positions)
    return Loaded(modules.depth_spec(module, src.sha256(), positions), {"x": source_rows(states, module.sources)},
                  lambda rows: _numpy({"routed": module.apply(split_sources(rows["x"], module.sources))}))


def _revive(src, bb, run_dir, positions):
    from agp.runtime.revive import Reviver
    rev = Reviver.load(bb, src.path)
    states = held_out_states(bb, rev.sources, positions)
    return Loaded(modules.revive_spec(rev, src.sha256(), positions), {"x": source_rows(states, rev.sources)},
                  lambda rows: shortlist_outputs(rev.decoder.logits(rev.module.apply(split_sources(rows["x"], rev.sources)))))


def _draft(src, bb, run_dir, positions):
    from agp.heads.draft import FeatureDraftHead, token_embeddings
    head, _ = FeatureDraftHead.load(bb, src.path)
    ids = held_out_tokens(bb, positions)
    f = held_out_states(bb, [bb.n_layers], positions)[bb.n_layers]     # f_i at the last `positions` tokens
    e = token_embeddings(bb, ids[-positions:])                            # e(x_{i+1}): the token after each

    def forward(rows):
        fe = _mx(rows["x"])
        state = head.predict(fe[:, :head.hidden], fe[:, head.hidden:])
        return {"next_state": _numpy({"s": state})["s"], **shortlist_outputs(head.shortlist_logits(state))}

    return Loaded(modules.draft_spec(head, src.sha256(), positions), {"x": np.concatenate([f, e], axis=1)}, forward)


_FINDERS = {"controller": _controller_source, "exit": _exit_sources, "depth": _depth_sources,
            "revive": _revive_source, "draft": _draft_source}
_LOADERS = {"controller": _controller, "exit": _exit, "depth": _depth, "revive": _revive, "draft": _draft}


def split_sources(rows: np.ndarray, sources) -> dict:
    """Inverse of `source_rows`: {block: [S, H]} from the side-by-side rows [S, k H]."""
    hidden = rows.shape[1] // len(sources)
    return {s: rows[:, i * hidden:(i + 1) * hidden] for i, s in enumerate(sources)}


def _numpy(outs: dict) -> dict:
    import mlx.core as mx
    mx.eval(*outs.values())
    return {k: np.asarray(v) for k, v in outs.items()}


def shortlist_outputs(z) -> dict:
    """An MLX shortlist head's logits in the package's terms: logits, the top-1 shortlist index
    and its probability (agp.heads.exit.shortlist_top1's rule)."""
    from agp.heads.exit import top1_probability
    out = _numpy({"logits": z, "p1": top1_probability(z)})
    return {"logits": out["logits"], "top1": out["logits"].argmax(-1), "p1": out["p1"]}


def compare(got: dict, ref: dict) -> dict:
    """Per output: relative error (and argmax agreement of 2-D outputs), or index agreement, of a
    package's channels-first outputs `got` against the MLX outputs `ref`."""
    wiring = {}
    for name, want in ref.items():
        if name not in got:
            raise AGPError(f"the package has no output '{name}' (it has {sorted(got)}); re-export it")
        mine = coreml.from_channels_first(got[name])
        if want.dtype.kind in "iu":
            wiring[name] = {"agreement": float((mine.astype(np.int64) == want.astype(np.int64)).mean())}
            continue
        scale = float(np.abs(want).max()) or 1.0
        wiring[name] = {"max_abs_err": float(np.abs(mine - want).max()), "scale": scale,
                        "rel_err": float(np.abs(mine - want).max() / scale)}
        if want.ndim == 2:
            wiring[name]["argmax_agreement"] = float((mine.argmax(1) == want.argmax(1)).mean())
    return wiring


def check(spec, package: Path, inputs: dict, ref: dict, positions: int) -> dict:
    """Structure, weight parity and numpy wiring parity of a saved package."""
    rb = coreml.read_back(package)
    coreml.check_provenance(rb, package, spec.source_sha256)
    weights = coreml.weight_parity(spec, rb)
    shapes_ok = rb.inputs == {n: [1, c, 1, positions] for n, c in spec.inputs.items()} and rb.outputs == spec.outputs
    # the package's inputs are fp16: feed the evaluator what Core ML would receive
    ranges = {}
    got = coreml.evaluate(rb, {n: coreml.to_channels_first(v.astype(np.float16)) for n, v in inputs.items()}, ranges)
    wiring = compare(got, ref)
    return {"ops": sorted(set(rb.ops)), "shapes_ok": bool(shapes_ok), "weights_exact": bool(all(weights.values())),
            "weights_checked": len(weights), "weights_mismatched": [k for k, v in weights.items() if not v],
            "wiring": wiring, "fp16_overflow": coreml.fp16_overflows(ranges),
            "largest_intermediate": max(ranges.values(), default=0.0)}


def export_run(run_dir, heads=None, positions: int = 8, model: str | None = None, progress=None,
               out_dir=None) -> dict:
    """Export and check every wanted head of the run into `out_dir` (default `<run>/ane`); returns
    (and writes there) the export record."""
    run_dir = Path(run_dir)
    sources = available(run_dir, heads)
    bb = run_backbone(run_dir, sources, model)
    out_dir = run_dir / "ane" if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = {}
    for src in sources:
        start = time.perf_counter()
        mod = load_module(src, bb, run_dir, positions)
        entry = coreml.export(mod.spec, out_dir, positions)
        entry["export_seconds"] = time.perf_counter() - start
        entry["parity"] = check(mod.spec, out_dir / entry["package"], mod.inputs, mod.reference(), positions)
        entry["source"] = str(src.path.relative_to(run_dir))
        exported[mod.spec.name] = entry
        if progress is not None:
            progress(mod.spec.name, entry)
    record = {"positions": positions, "modules": exported, "coremltools": _ct_version(),
              "macos_only": ["Core ML prediction parity", "decision agreement through Core ML",
                             "latency per compute unit", "Neural Engine placement", "energy (powermetrics)"]}
    io.write_json(out_dir / "export.json", record)
    return record


def packaged_modules(run_dir, out_dir, record: dict, model: str | None = None):
    """(Loaded, package path) for every package of an export record, each paired with the run's
    current head files and refused (AGPError) when it was exported from other weights."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    sources = available(run_dir, sorted({module_kind(name) for name in record["modules"]}))
    bb = run_backbone(run_dir, sources, model)
    for src in sources:
        mod = load_module(src, bb, run_dir, record["positions"])
        entry = record["modules"].get(mod.spec.name)
        if entry is None:
            raise AGPError(f"{mod.spec.name} has no package in {out_dir} (the run gained it after the export); "
                           f"re-export with `agp export coreml`")
        package = out_dir / entry["package"]
        coreml.check_provenance(coreml.read_back(package), package, mod.spec.source_sha256)
        yield mod, package


def read_record(out_dir: Path) -> dict:
    path = Path(out_dir) / "export.json"
    if not path.exists():
        raise AGPError(f"no export record at {path}; run `agp export coreml` first")
    return json.loads(path.read_text())


def verify_run(run_dir, out_dir=None, model: str | None = None) -> dict:
    """Re-check saved packages against the run's current heads without re-exporting: {module: check}."""
    out_dir = Path(run_dir) / "ane" if out_dir is None else Path(out_dir)
    record = read_record(out_dir)
    return {mod.spec.name: check(mod.spec, package, mod.inputs, mod.reference(), record["positions"])
            for mod, package in packaged_modules(run_dir, out_dir, record, model)}


def coreml_parity(run_dir, out_dir, record: dict, compute_units: str, model: str | None = None) -> dict:
    """{module: per-output parity} of Core ML's own prediction on `compute_units` against MLX, for
    every package of an export record (macOS only: `coreml.load_model` refuses elsewhere)."""
    out = {}
    for mod, package in packaged_modules(run_dir, out_dir, record, model):
        got = coreml.predict(package, {n: coreml.to_channels_first(v) for n, v in mod.inputs.items()}, compute_units)
        out[mod.spec.name] = compare(got, mod.reference())
    return out


def module_kind(module_name: str) -> str:
    """The head kind a package name comes from (exit_L6 -> exit, revive_L6 -> revive)."""
    return module_name.split("_L")[0]


def run_backbone(run_dir: Path, sources, model: str | None = None):
    """The backbone the run's heads were made on (None when only the controller is wanted: it
    reads saved feature rows, not the model)."""
    from agp.backbone import backbone
    if all(s.kind == "controller" for s in sources):
        return None
    path = Path(run_dir) / "runtime" / "runtime.json"
    if not path.exists():
        raise AGPError(f"run {run_dir} has no runtime stage record (the backbone its heads were made on); "
                       f"run `agp run --stage runtime` first")
    meta = json.loads(path.read_text())
    return backbone.load(model or meta.get("model"), meta.get("adapter_dir"))


def _ct_version() -> str:
    ct, _, _ = coreml._coremltools()
    return ct.__version__


def summary_rows(record: dict) -> list[str]:
    rows = []
    for name, e in record["modules"].items():
        p = e["parity"]
        errs = ", ".join(f"{k} rel {v['rel_err']:.2e}" if "rel_err" in v else f"{k} agree {v['agreement']:.3f}"
                         for k, v in p["wiring"].items())
        rows.append(f"{name:14s} {e['bytes'] / 1e6:7.2f} MB  shapes {'ok' if p['shapes_ok'] else 'WRONG'}  "
                    f"weights {'exact' if p['weights_exact'] else 'MISMATCH ' + str(p['weights_mismatched'])} "
                    f"({p['weights_checked']})  {errs}"
                    + (f"  fp16 OVERFLOW at {p['fp16_overflow']}" if p.get("fp16_overflow") else ""))
    return rows


