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
from agp.ane import coreml
from agp.errors import AGPError

HEADS = ("controller", "exit")
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
    """The heads the run holds, refusing a wanted head whose stage has not produced it."""
    run_dir = Path(run_dir)
    wanted = list(HEADS) if wanted is None else list(wanted)
    unknown = [w for w in wanted if w not in HEADS]
    if unknown:
        raise AGPError(f"unknown head(s) {unknown}; choose from {', '.join(HEADS)}")
    out = []
    if "controller" in wanted:
        d = run_dir / "controller" / "heads"
        if not (d / "heads.json").exists():
            raise AGPError(f"run {run_dir} has no controller heads; run `agp run --stage controller` first")
        out.append(Source("controller", d, [d / "heads.safetensors", d / "norm.npz", d / "heads.json"]))
    if "exit" in wanted:
        dirs = sorted((run_dir / "runtime" / "exit_heads").glob("L*"), key=lambda p: int(p.name[1:]))
        if not dirs:
            raise AGPError(f"run {run_dir} has no exit heads; run `agp run --stage runtime` first")
        out += [Source("exit", d, [d / "exit_head.safetensors", d / "exit_head.json"]) for d in dirs]
    return out


def held_out_features(run_dir: Path, n: int) -> np.ndarray:
    """The controller's held-out feature rows (what the exported controller will be fed)."""
    path = Path(run_dir) / "controller" / "features.npz"
    if not path.exists():
        raise AGPError(f"no controller features at {path}; run `agp run --stage controller`")
    z = np.load(path)
    held = z["split"] == "heldout"
    rows = z["features"][held] if held.any() else z["features"]
    return rows[:n].astype(np.float32)


def held_out_states(bb, layer: int, n: int) -> np.ndarray:
    """Hidden states after `layer` blocks on a fixed text outside the lanes (n positions)."""
    import mlx.core as mx
    ids = bb.encode(HELDOUT_TEXT * 4)[: n + 1]
    _, got = bb.capture(mx.array(ids), [layer])
    return np.asarray(got[layer][0, -n:]).astype(np.float32)


def spec_and_reference(src: Source, bb, run_dir: Path, positions: int):
    """(ModuleSpec, input rows [S, C], MLX outputs {name: [S, ...]}) for one source head."""
    if src.kind == "controller":
        from agp.heads.controller import Controller
        ctl = Controller.load(src.path)
        x = held_out_features(run_dir, positions)
        return coreml.controller_spec(ctl, src.sha256()), {"x": x}, ctl.logits(x)
    from agp.heads.exit import ExitHead
    head, _ = ExitHead.load(bb, src.path)
    h = held_out_states(bb, head.layer, positions)
    return coreml.exit_spec(head, src.sha256()), {"x": h}, exit_reference(head, h)


def exit_reference(head, h: np.ndarray) -> dict:
    """The MLX exit head's outputs in the package's terms: logits, top-1 shortlist index, its probability."""
    import mlx.core as mx
    from agp.heads.exit import shortlist_top1
    z = head.logits(mx.array(h))
    mx.eval(z)
    p1, _ = shortlist_top1(head, h)
    return {"logits": np.asarray(z), "top1": np.asarray(z).argmax(-1), "p1": p1}


def check(spec, package: Path, inputs: dict, ref: dict, positions: int) -> dict:
    """Structure, weight parity and numpy wiring parity of a saved package."""
    rb = coreml.read_back(package)
    coreml.check_provenance(rb, package, spec.source_sha256)
    weights = coreml.weight_parity(spec, rb)
    shapes_ok = rb.inputs == {n: [1, c, 1, positions] for n, c in spec.inputs.items()} and rb.outputs == spec.outputs
    # the package's inputs are fp16: feed the evaluator what Core ML would receive
    got = coreml.evaluate(rb, {n: coreml.to_channels_first(v.astype(np.float16)) for n, v in inputs.items()})
    wiring = {}
    for name, want in ref.items():
        mine = coreml.from_channels_first(got[name])
        if want.dtype.kind in "iu":
            wiring[name] = {"agreement": float((mine.astype(np.int64) == want.astype(np.int64)).mean())}
        else:
            scale = float(np.abs(want).max()) or 1.0
            wiring[name] = {"max_abs_err": float(np.abs(mine - want).max()), "scale": scale,
                            "rel_err": float(np.abs(mine - want).max() / scale)}
            if want.ndim == 2:
                wiring[name]["argmax_agreement"] = float((mine.argmax(1) == want.argmax(1)).mean())
    return {"ops": sorted(set(rb.ops)), "shapes_ok": bool(shapes_ok), "weights_exact": bool(all(weights.values())),
            "weights_checked": len(weights), "weights_mismatched": [k for k, v in weights.items() if not v],
            "wiring": wiring}


def export_run(run_dir, heads=None, positions: int = 8, model: str | None = None, progress=None,
               out_dir=None) -> dict:
    """Export and check every wanted head of the run into `out_dir` (default `<run>/ane`); returns
    (and writes there) the export record."""
    from agp.backbone import backbone
    run_dir = Path(run_dir)
    sources = available(run_dir, heads)
    bb = None
    if any(s.kind == "exit" for s in sources):
        meta = json.loads((run_dir / "runtime" / "runtime.json").read_text())
        bb = backbone.load(model or meta.get("model"), meta.get("adapter_dir"))
    out_dir = run_dir / "ane" if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = {}
    for src in sources:
        start = time.perf_counter()
        spec, inputs, ref = spec_and_reference(src, bb, run_dir, positions)
        entry = coreml.export(spec, out_dir, positions)
        entry["export_seconds"] = time.perf_counter() - start
        entry["parity"] = check(spec, out_dir / entry["package"], inputs, ref, positions)
        entry["source"] = str(src.path.relative_to(run_dir))
        modules[spec.name] = entry
        if progress is not None:
            progress(spec.name, entry)
    record = {"positions": positions, "modules": modules, "coremltools": _ct_version(),
              "macos_only": ["Core ML prediction parity", "decision agreement through Core ML",
                             "latency per compute unit", "Neural Engine placement", "energy (powermetrics)"]}
    io.write_json(out_dir / "export.json", record)
    return record


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
                    f"({p['weights_checked']})  {errs}")
    return rows


