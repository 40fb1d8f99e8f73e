"""Stage `depth` (stage 3): the depth-routing residual module, distilled to full depth, its
ablations, and the revive operation it makes possible.

Reads the backbone and lanes the runtime stage used (agp.train.runtime.source), the controller's
tuned-lens translators (controller/translators.npz), decision layer D and label rule, and the
runtime's exit heads (their shortlist rows, the rows the module is trained on).
Steps (each a small function returning a small dataclass):
  inputs        backbone, rows, translators, candidate blocks (D and the late boundary B), label rule
  collect       hidden states after every block 0..B and after all blocks (train / held-out positions)
  train_modules per candidate block: the module alone and the module + the tuned-lens translator
  ablate        per block on the same held-out positions: plain residual, naive depth mixing,
                tuned lens, module, module + translator: KL to full depth, top-1, acceptable share
  revive_table  for positions the tuned-lens state at D leaves unacceptable: how many revive at D
                (module at D, shortlist emission) and at B make acceptable, at what MACs
  write         modules/L<l>/, revive/ (the runtime's revive operation), identity sample, report
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agp import config, io
from agp.config import ConfigMixin
from agp.errors import AGPError
from agp.heads.depth import DepthArgs

NAME = "depth"
MARKER = "stage3"
REQUIRES = ["controller", "runtime"]   # the tuned-lens translators and D; the exit heads' shortlist
HEADLINE = {"KL vs tuned lens at D": "headline.kl_ratio_vs_tuned_at_d",
            "revive rescues": "headline.revive_rescued_share"}
VARIANTS = ("plain residual", "naive depth mixing", "tuned lens", "module", "module + translator")


@dataclass
class DepthStageArgs(ConfigMixin):
    # CI size: ~3 minutes on 2 shared cores; configs/real-size.yaml holds the offline size.
    prompts: int = 32                 # train prompts (every position up to per_prompt is used)
    heldout_prompts: int = 8          # held-out prompts the ablations and the revive table read
    heldout_per_prompt: int = 32      # held-out positions per prompt (the vocabulary-wide head is the cost)
    max_tokens: int = 96              # tokens per prompt
    per_prompt: int = 48              # positions per prompt
    layers: list | None = None        # candidate blocks; None: the controller's D and the runtime's late boundary
    module: DepthArgs = field(default_factory=DepthArgs)
    probe_batch: int = 64             # positions per vocabulary-wide head call in the evaluation

    def validate(self) -> None:
        for name in ("prompts", "heldout_prompts", "max_tokens", "per_prompt", "probe_batch"):
            if getattr(self, name) < 1:
                raise AGPError(f"--depth-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def run(run, args) -> dict:
    """Train, ablate and build the revive operation; writes <run>/depth/."""
    t0 = time.perf_counter()
    cfg = config.for_stage(DepthStageArgs, NAME, args)
    out = run.stage_dir(NAME)
    inp = inputs(run, cfg, getattr(args, "model", None))
    timings = {"load_s": time.perf_counter() - t0}
    t = time.perf_counter()
    data = collect(inp, cfg)
    timings["states_s"] = time.perf_counter() - t
    t = time.perf_counter()
    modules = train_modules(inp, data, cfg)
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    table = ablate(inp, data, modules, cfg)
    revive = revive_table(inp, data, modules, table)
    timings["evaluate_s"] = time.perf_counter() - t
    write(out, inp, data, modules, table, revive)
    metrics = stage_metrics(cfg, inp, data, modules, table, revive, timings)
    from agp.report.depth import write_report
    write_report(out, metrics)
    timings["total_s"] = time.perf_counter() - t0
    run.update_stage(NAME, artifacts={"modules": run.relative(out / "modules"), "revive": run.relative(out / "revive")})
    return io.json_safe(metrics)


# --- inputs ---------------------------------------------------------------------------------------
@dataclass
class Inputs:
    bb: object
    rows: dict
    adapter_dir: str | None
    translators: dict                # layer -> Translator (controller, fitted on every prompt)
    shortlist: dict                  # layer -> shortlist ids of the runtime's exit head there
    layers: list                     # candidate blocks, sorted
    decision: int                    # D
    late: int                        # B
    label: dict                      # the controller's chosen label parameters


def inputs(run, cfg: DepthStageArgs, model=None) -> Inputs:
    from agp.oracle.probes import Translator
    from agp.runtime import heads as H
    from agp.train.runtime import source
    run.require("controller", NAME)
    run.require("runtime", NAME)
    tpath = Path(run.path) / "controller" / "translators.npz"
    if not tpath.exists():
        raise AGPError(f"run {run.path} has no controller translators ({tpath.name}); "
                       f"run `agp run --stage controller` with its tuned lens on")
    src = source(run, model)
    bb = src.bb
    heads = H.load(run, bb, "speculative")
    calib = json.loads((Path(run.path) / "controller" / "heads" / "calibration.json").read_text())
    d, late = int(calib["decision_layer"]), int(heads.meta.get("late_boundary", [bb.n_layers - 3])[0])
    layers = sorted({int(x) for x in (cfg.layers or [d, late])})
    with np.load(tpath) as z:
        tr = {int(k[1:]): Translator(z[k], z["b" + k[1:]]) for k in z.files if k.startswith("W")}
    missing = [x for x in layers if x not in tr or x not in heads.exits]
    if missing or not 0 < layers[0] or layers[-1] >= bb.n_layers:
        raise AGPError(f"candidate blocks {missing or layers} need a controller translator and a runtime exit head "
                       f"(translators at {sorted(tr)}, exit heads at {sorted(heads.exits)}); pick --depth-layers "
                       f"among both or rerun `agp run --stage controller` / `--stage runtime` with them")
    label = run.stage("controller")["metrics"]["labels"]["chosen"]
    return Inputs(bb, src.rows, src.adapter_dir, tr, {x: heads.exits[x].ids_np for x in layers}, layers, d, late,
                  label)


# --- states ---------------------------------------------------------------------------------------
@dataclass
class Data:
    train: dict                      # block -> [N, H] for blocks 0..max(layers) and n
    held: dict
    positions: dict                  # split -> count
    context: int                     # keys attended over in the MAC counts (half the prompt, as the controller)


def collect(inp: Inputs, cfg: DepthStageArgs) -> Data:
    from agp.train.runtime import collect_states, pick
    blocks = list(range(0, max(inp.layers) + 1))
    tr = collect_states(inp.bb, pick(inp.rows["train"], cfg.prompts), blocks, cfg.max_tokens, cfg.per_prompt,
                        "depth: train states")
    he = collect_states(inp.bb, pick(inp.rows["heldout"], cfg.heldout_prompts), blocks, cfg.max_tokens,
                        cfg.heldout_per_prompt, "depth: held-out states")
    n = inp.bb.n_layers
    return Data(tr.hidden, he.hidden, {"train": int(len(tr.hidden[n])), "heldout": int(len(he.hidden[n]))},
                max(1, cfg.max_tokens // 2))


# --- training -------------------------------------------------------------------------------------
@dataclass
class Modules:
    plain: dict                      # layer -> DepthModule decoded without a translator
    translated: dict                 # layer -> DepthModule decoded through the tuned-lens translator
    history: dict                    # "L<l> module" -> loss history
    identity_exact: dict             # layer -> True when the untrained module returned h_l bit for bit


def train_modules(inp: Inputs, data: Data, cfg: DepthStageArgs) -> Modules:
    from agp.heads.depth import Decoder, DepthModule, distill, routed_states
    plain, translated, hist, ident = {}, {}, {}, {}
    n = inp.bb.n_layers
    bar = tqdm(total=2 * len(inp.layers) * cfg.module.steps, desc="depth modules", unit="step")
    for layer in inp.layers:
        sources = list(range(0, layer + 1))
        for key, tr, into in (("module", None, plain), ("module + translator", inp.translators[layer], translated)):
            m = DepthModule.identity(layer, sources, data.train, cfg.module.rank, cfg.module.seed)
            ident[layer] = bool(np.array_equal(routed_states(m, data.held), data.held[layer]))
            hist[f"L{layer} {key}"] = distill(m, Decoder(inp.bb, inp.shortlist[layer], tr), data.train,
                                              data.train[n], cfg.module, bar)["history"]
            into[layer] = m
    bar.close()
    return Modules(plain, translated, hist, ident)


# --- ablations ------------------------------------------------------------------------------------
@dataclass
class Table:
    rows: list                       # {"layer", "variant", "kl", "top1", "acceptable"}
    kl: dict                         # (layer, variant) -> [P] KL per held-out position
    agree: dict                      # (layer, variant) -> [P] top-1 agreement
    ok: dict                         # (layer, variant) -> [P] acceptable under the label rule
    teacher_top1: np.ndarray         # [P] the full-depth token


def variant_states(inp: Inputs, data: Data, modules: Modules, layer: int) -> dict:
    from agp.heads.depth import routed_states, uniform_mix
    h, tr = data.held, inp.translators[layer]
    return {"plain residual": h[layer], "naive depth mixing": uniform_mix(h, layer, list(range(0, layer + 1))),
            "tuned lens": tr(h[layer]), "module": routed_states(modules.plain[layer], h),
            "module + translator": tr(routed_states(modules.translated[layer], h))}


def ablate(inp: Inputs, data: Data, modules: Modules, cfg: DepthStageArgs) -> Table:
    """Every variant through the vocabulary-wide head against full depth, same held-out positions."""
    from agp.oracle.labels import LabelArgs, acceptable
    from agp.oracle.probes import probe_stats
    n, rule = inp.bb.n_layers, LabelArgs.from_dict(inp.label)
    rows, kl, agree, ok = [], {}, {}, {}
    final = data.held[n]
    for layer in inp.layers:
        states = variant_states(inp, data, modules, layer)
        keys = list(range(len(VARIANTS)))
        parts = [probe_stats(inp.bb, {i: states[v][a:a + cfg.probe_batch] for i, v in enumerate(VARIANTS)},
                             final[a:a + cfg.probe_batch], keys, full_layers=[])
                 for a in range(0, len(final), cfg.probe_batch)]
        for i, v in enumerate(VARIANTS):
            kl[layer, v] = np.concatenate([p["kl"][i] for p in parts])
            agree[layer, v] = np.concatenate([p["agree"][i] for p in parts])
            ok[layer, v] = acceptable(kl[layer, v], agree[layer, v], rule)
            rows.append({"layer": layer, "variant": v, "kl": float(kl[layer, v].mean()),
                         "top1": float(agree[layer, v].mean()), "acceptable": float(ok[layer, v].mean())})
    return Table(rows, kl, agree, ok, np.concatenate([p["teacher_top1"] for p in parts]))


# --- the revive operation -------------------------------------------------------------------------
@dataclass
class Revive:
    rows: list                       # one per revive point (at D, at B): rescued share, MACs
    chosen: int                      # the block the deployed revive operation works at
    why: str
    unacceptable: int                # held-out positions the tuned-lens state at D leaves unacceptable


def revive_table(inp: Inputs, data: Data, modules: Modules, table: Table) -> Revive:
    """Among positions whose tuned-lens state at D is not acceptable: the share the module +
    translator makes acceptable at D and at B, the shortlist-emitted token's agreement, and the
    MACs of each against running the remaining layers D..n and the full head."""
    from agp.heads.depth import Decoder
    from agp.runtime.cost import CostModel
    d, n, ctx = inp.decision, inp.bb.n_layers, data.context
    bad = ~table.ok[d, "tuned lens"]
    costs = CostModel(inp.bb)
    remaining = costs.layers(d, n, ctx).macs + costs.head_macs
    rows = []
    for layer in inp.layers:
        if layer < d:
            continue
        m = modules.translated[layer]
        dec = Decoder(inp.bb, inp.shortlist[layer], inp.translators[layer])
        emitted = shortlist_agreement(data, m, dec, table.teacher_top1)
        macs = costs.layers(d, layer, ctx).macs + m.macs() + dec.macs()
        rows.append({"layer": layer, "positions": int(bad.sum()),
                     "rescued_share": float(table.ok[layer, "module + translator"][bad].mean()) if bad.any() else None,
                     "plain_rescued_share": float(table.ok[layer, "tuned lens"][bad].mean()) if bad.any() else None,
                     "emitted_top1_on_unacceptable": float(emitted[bad].mean()) if bad.any() else None,
                     "macs": int(macs), "remaining_macs": int(remaining), "mac_ratio_vs_remaining": macs / remaining})
    # Deployed at D. Measured on the reference run (docs/depth.md): revive at the late boundary rescued
    # 0.553 of these positions, but the tuned lens alone there (what continue_local does) already
    # rescued 0.520, so revive at B is continue_local plus a module; at D it is its own operation,
    # between accept_local and continue_local in cost.
    why = "at D: the only point that is not continue_local plus a module (docs/depth.md)"
    return Revive(rows, d if d in inp.layers else rows[0]["layer"], why, int(bad.sum()))


def shortlist_agreement(data: Data, module, dec, top1: np.ndarray) -> np.ndarray:
    """[P] whether revive's emitted shortlist token equals the full-depth token."""
    import mlx.core as mx
    from agp.heads.depth import routed_states
    z = dec.logits(mx.array(routed_states(module, data.held)))
    tok = mx.array(dec.ids_np)[mx.argmax(z, axis=-1)]
    mx.eval(tok)
    return np.asarray(tok) == top1


# --- artifacts ------------------------------------------------------------------------------------
def write(out: Path, inp: Inputs, data: Data, modules: Modules, table: Table, revive: Revive) -> None:
    """modules/L<l>/ (module + translator, the deployed form), revive/, identity_sample.npz, ablation.json."""
    from agp.runtime.revive import save_revive
    fp = inp.bb.fingerprint
    for layer, m in modules.translated.items():
        m.save(out / "modules" / f"L{layer}", {"model_fingerprint": fp, "decoder": "controller tuned-lens translator"})
    save_revive(out / "revive", modules.translated[revive.chosen], inp.translators[revive.chosen],
                inp.shortlist[revive.chosen], fp, {"decision_layer": inp.decision, "why": revive.why})
    sample = {f"h{s}": data.held[s][:64] for s in range(0, max(inp.layers) + 1)}
    with io.atomic_path(out / "identity_sample.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **sample)
    io.write_json(out / "ablation.json", {"rows": table.rows, "revive": revive.rows})


def stage_metrics(cfg, inp: Inputs, data: Data, modules: Modules, table: Table, revive: Revive, timings) -> dict:
    by = {(r["layer"], r["variant"]): r for r in table.rows}
    ratio = {str(x): by[x, "module + translator"]["kl"] / by[x, "tuned lens"]["kl"] for x in inp.layers}
    chosen = next(r for r in revive.rows if r["layer"] == revive.chosen)
    return {"config": cfg.to_dict(), "backbone": "adapter" if inp.adapter_dir else "base",
            "model_fingerprint": inp.bb.fingerprint, "layers": inp.layers, "decision_layer": inp.decision,
            "late_boundary": inp.late, "label_rule": inp.label, "positions": data.positions,
            "identity_exact": {str(k): v for k, v in modules.identity_exact.items()},
            "ablation": table.rows, "kl_ratio_module_translator_vs_tuned": ratio,
            "training": modules.history, "module_macs": {str(x): modules.translated[x].macs() for x in inp.layers},
            "revive": {"rows": revive.rows, "chosen_layer": revive.chosen, "why": revive.why,
                       "unacceptable_positions": revive.unacceptable},
            "headline": {"kl_ratio_vs_tuned_at_d": ratio.get(str(inp.decision)),
                         "revive_rescued_share": chosen["rescued_share"]},
            "timings": timings}


CONFIG = DepthStageArgs  # the dataclass `agp run` makes this stage's flags and --config section from
