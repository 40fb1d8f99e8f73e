"""Stage 2 — controller: oracle labels, label sweep, three-head controller, baselines, calibration.

Teacher = the full-depth model: the adapter-tuned backbone on the stage-1 routing lane when the
adapter stage finished, else the base backbone on the stage-0 prompt pack (the manifest says which).
Rules: docs/labels.md. Outputs in <run>/controller/: oracle.npz (per-position probe stats and
labels), sweep.json, heads/ (three-head controller + temperatures + thresholds), translators.npz,
decisions.jsonl (held-out decision-and-confidence records), report.md + PNGs.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agp import config, io
from agp.backbone.lens import probe_positions
from agp.calibrate.metrics import auroc, bootstrap_recall, ece, nll, per_class
from agp.calibrate.policy import (ACC, ESC, REV, PolicyArgs, choose_gate, confidence, decide, fit_thresholds,
                                  gate_sweep, recall_frontier)
from agp.calibrate.temperature import fit_temperature, softmax
from agp.config import ConfigMixin
from agp.errors import AGPError
from agp.heads import baselines
from agp.heads.controller import TASKS, Controller, HeadArgs, train
from agp.oracle.labels import ROUTES, VITALITY, LabelArgs, class_shares, require_all_classes, route_labels
from agp.oracle.probes import fit_translator, hidden_at, probe_stats
from agp.oracle.sweep import sweep

NAME = "controller"
MARKER = "stage2"
REQUIRES = ["baseline"]
ALIASES = {"probe_layers": ["controller-layers"], "heads.steps": ["controller-steps"]}  # kept from before
HEADLINE = {"route macro-F1": "controller.route_argmax.macro_f1",
            "policy macro-F1": "controller.route_policy.macro_f1"}
SPLITS = ("train", "valid", "heldout")


@dataclass
class ControllerArgs(ConfigMixin):
    prompts: int = 120                # prompts used (source first, topped up from the same pack builder)
    max_tokens: int = 128             # each prompt truncated to this many tokens
    positions: int = 24               # probed positions per prompt (the full-width head is the cost)
    # 40 x 16 left 128 held-out positions from 8 prompts: per-class recall moved ~0.1 with one prompt.
    # Offline on the adapter backbone, 416 x 32 positions raised held-out route macro-F1 from ~0.45
    # to 0.60 with the same heads; 120 x 24 is what the CI budget affords (~3 min on 2 cores).
    probe_layers: list | None = None  # layers probed by the oracle (the decision layer must be one); None: n/3, n/2, 2n/3, n-3, n-1
    decision_layer: int | None = None  # layer whose state the controller decides at (a probe layer); None: 2n/3
    read_layers: list | None = None   # hidden layers the heads read; None: n/3, n/2, decision
    tuned_lens: bool = True           # per-layer ridge translators before the head
    probe_batch: int = 64             # positions per head call (amortises reading the vocabulary-wide table)
    lens_folds: int = 4               # tuned-lens cross-fitting folds (by prompt)
    # Residual translator ridge: cross-fitted on 768 adapter-backbone positions, top-1 agreement at
    # layers 6/9/12/15/17 was 0.35/0.41/0.57/0.73/0.86 at 0.1 vs 0.28/0.35/0.52/0.70/0.82 at 1.0, and
    # 0.28/0.33/0.46/0.62/0.63 for the old non-residual map (identity: 0.68 at 17).
    lens_ridge: float = 0.1           # residual translator ridge (standardised inputs)
    min_stability: float = 0.8        # label sweep: least share of labels unchanged under resampling
    heads: HeadArgs = field(default_factory=HeadArgs)
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    agree_targets: tuple = (0.9, 0.95)  # agreement levels the savings curves report

    def validate(self) -> None:
        if self.probe_layers:
            self.probe_layers = sorted({int(layer) for layer in self.probe_layers})
        for name in ("prompts", "positions", "max_tokens", "probe_batch", "lens_folds"):
            if getattr(self, name) < 1:
                raise AGPError(f"--controller-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def default_layers(n: int) -> tuple[list[int], int]:
    """Probe layers and decision layer for an n-layer model."""
    probe = sorted({x for x in (n // 3, n // 2, 2 * n // 3, n - 3, n - 1) if 0 < x < n})
    return probe, 2 * n // 3





def _read_prompts(path: Path) -> list[dict]:
    if not path.exists():
        raise AGPError(f"missing {path}; run the stage that writes it first")
    rows = io.read_jsonl(path, "rerun the stage that wrote it")
    for i, row in enumerate(rows):
        if not isinstance(row.get("text"), str) or "id" not in row:
            raise AGPError(f"{path} row {i + 1} lacks 'id'/'text'; rerun the stage that wrote it")
    return rows


# ------------------------------------------------------------------------------------------------
# The stage: a thin `run` over named steps, each returning one small dataclass.
# ------------------------------------------------------------------------------------------------

def run(run, args) -> dict:
    """Label, sweep, train, calibrate and compare; write the stage-2 artifacts."""
    from agp.backbone import load

    t_start = time.perf_counter()
    timings = {}
    cfg = config.for_stage(ControllerArgs, NAME, args)
    out = run.stage_dir(NAME)
    prompts = choose_prompts(source(run), cfg)
    backbone = load(getattr(args, "model", None), adapter=prompts.adapter_dir)
    layers = choose_layers(backbone.n_layers, cfg)
    timings["load_s"] = time.perf_counter() - t_start

    step_start = time.perf_counter()
    probes = collect(backbone, prompts.rows, cfg, layers)
    timings["oracle_probes_s"] = time.perf_counter() - step_start
    oracle_speed = measure_oracle_speed(backbone, probes, layers, cfg)
    labels = label(probes, layers, cfg)
    io.write_json(out / "sweep.json", labels.sweep)

    step_start = time.perf_counter()
    heads = train_heads(probes, labels, layers, cfg)
    timings["heads_s"] = time.perf_counter() - step_start
    layer_macs = backbone.layer_macs(context=cfg.max_tokens // 2)
    if heads.controller.macs() > max(layer_macs):
        raise AGPError(f"controller costs {heads.controller.macs()} MACs per decision, over one layer's "
                       f"{max(layer_macs)}; shrink the heads or read fewer layers")

    calibration = calibrate(heads, labels, probes, layers, cfg)
    compared = compare_baselines(backbone, probes, labels, layers, heads, cfg)
    left_out = leave_one_source_out(probes, labels, heads, calibration, cfg)
    savings = savings_curves(backbone, layer_macs, probes, labels, layers, heads, calibration, compared, cfg)
    write_artifacts(out, probes, labels, layers, heads, calibration)
    metrics = stage_metrics(run, out, cfg, prompts, backbone, layer_macs, probes, labels, layers, heads,
                            calibration, compared, savings, timings)
    metrics["oracle_speed"] = oracle_speed
    metrics["leave_one_source_out"] = left_out
    timings["before_report_s"] = time.perf_counter() - t_start
    from agp.report.controller import write_report
    write_report(out, metrics, calibration.route_heldout, heads.targets["heldout"]["route"], labels.sweep["rows"])
    timings["total_s"] = time.perf_counter() - t_start
    run.manifest.setdefault("datasets", {})["controller/oracle.npz"] = metrics["dataset"]["sha256_oracle"]
    run.update_stage(NAME, artifacts={"heads_dir": run.relative(out / "heads"), "oracle": run.relative(out / "oracle.npz"),
                                      "decisions": run.relative(out / "decisions.jsonl")})
    return io.json_safe(metrics)


@dataclass
class Source:
    """Where the teacher and the prompts come from."""
    backbone: str              # "adapter" (stage-1 tuned) or "base"
    adapter_dir: str | None
    prompt_source: str         # run-relative path of the prompt rows
    rows: list[dict]
    resplit: bool              # the rows' own splits are not trusted (baseline pack): re-split by hash


def source(run) -> Source:
    """Backbone and prompts: the adapter + routing lane when stage 1 finished, else base + baseline pack."""
    adapter = run.stage("adapter")
    if adapter.get("status") == "done":
        adapter_dir = run.artifact("adapter", "adapter_dir")
        if not adapter_dir or not adapter_dir.exists():
            raise AGPError(f"adapter stage of {run.path} finished but its adapter_dir ({adapter_dir}) is missing; "
                           f"rerun `agp run --stage adapter`")
        lane = run.path / "adapter" / "data" / "routing"
        rows = []
        for split in SPLITS:
            rows += [dict(r, split=r.get("split", split)) for r in _read_prompts(lane / f"{split}.jsonl")]
        return Source("adapter", str(adapter_dir), "adapter/data/routing", rows, resplit=False)
    run.require("baseline", NAME)
    rows = _read_prompts(run.path / "baseline" / "prompts.jsonl")
    return Source("base", None, "baseline/prompts.jsonl", rows, resplit=True)


@dataclass
class Prompts:
    """The labelled prompts, with their splits, and how they were chosen."""
    rows: list[dict]
    backbone: str
    adapter_dir: str | None
    prompt_source: str
    topped_up: int             # rows added from the prompt-pack builder to reach cfg.prompts
    resplit: bool              # splits were reassigned 60/20/20 by hash


def choose_prompts(src: Source, cfg: ControllerArgs) -> Prompts:
    """Exactly cfg.prompts rows when the source and the pack builder have them, with usable splits."""
    from agp.data.prompt_pack import PromptPackArgs, build_prompt_pack

    rows, topped = src.rows, 0
    if len(rows) < cfg.prompts:
        seen = {r["id"] for r in rows}
        extra = [r for r in build_prompt_pack(PromptPackArgs(per_source=cfg.prompts)) if r["id"] not in seen]
        topped = min(cfg.prompts - len(rows), len(extra))
        rows = rows + extra[:topped]
    if len(rows) > cfg.prompts:          # a hash-ordered sample keeps the source's mix of splits and kinds
        rows = sorted(rows, key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())[: cfg.prompts]
    rows, resplit = assign_splits(rows, src.resplit)
    return Prompts(rows, src.backbone, src.adapter_dir, src.prompt_source, topped, resplit)


@dataclass
class Layers:
    n: int                     # the backbone's layer count (full depth)
    probe: list[int]           # layers whose tuned-lens answer is scored against full depth
    decision: int              # D: the layer the controller decides at
    read: list[int]            # hidden layers the heads read
    exits: list[int]           # earliest-layer classes: the probe layers, then full depth


def choose_layers(n: int, cfg: ControllerArgs) -> Layers:
    probe, decision = default_layers(n)
    if cfg.probe_layers:
        probe = cfg.probe_layers
        if any(not 0 < layer < n for layer in probe):
            raise AGPError(f"--controller-layers must lie in 1..{n - 1}, got {probe}")
    decision = cfg.decision_layer or decision
    if decision not in probe:
        raise AGPError(f"decision layer {decision} is not among the probe layers {probe}; "
                       f"include it in --controller-layers")
    read = cfg.read_layers or sorted({x for x in (n // 3, n // 2, decision) if 0 < x <= decision})
    return Layers(n, probe, decision, read, probe + [n])


def assign_splits(rows: list[dict], force: bool) -> tuple[list[dict], bool]:
    """Keep the rows' splits when each holds >= 15% of the prompts, else 60/20/20 by sha256(id) rank
    within each source (so held-out mixes code, docs and chat like train does)."""
    n = len(rows)
    counts = {s: sum(r.get("split") == s for r in rows) for s in SPLITS}
    if not force and all(c >= max(2, 0.15 * n) for c in counts.values()):
        return rows, False
    out = [dict(r) for r in rows]
    for src in sorted({str(r.get("source")) for r in rows}):
        mine = [i for i, r in enumerate(rows) if str(r.get("source")) == src]
        mine.sort(key=lambda i: hashlib.sha256(str(rows[i]["id"]).encode()).hexdigest())
        m = len(mine)
        for rank, i in enumerate(mine):
            out[i]["split"] = "train" if rank < round(0.6 * m) else "valid" if rank < round(0.8 * m) else "heldout"
    return out, True


@dataclass
class Probes:
    """Per probed position: the probe statistics [n_probe, N] (tuned lens at each probe layer vs full
    depth), the hidden states the heads and baselines read, and where the position came from."""
    kl: np.ndarray
    agree: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    p1: np.ndarray
    teacher_margin: np.ndarray
    teacher_entropy: np.ndarray
    hidden: dict               # layer -> [N, hidden]
    split: np.ndarray
    prompt: np.ndarray
    position: np.ndarray
    translators: dict | None   # layer -> Translator fitted on every prompt (saved for later stages)
    timing: dict | None = None  # seconds of the hidden-state pass, the probe pass and in all
    source: np.ndarray | None = None  # the prompt's source (code, docs, chat, ...) per position


PROBE_STATS = ("kl", "agree", "margin", "entropy", "p1", "teacher_margin", "teacher_entropy")


def collect(backbone, rows, cfg: ControllerArgs, layers: Layers, progress=True) -> Probes:
    """Hidden states and probe statistics for every prompt. Tuned-lens translators are cross-fitted
    (docs/labels.md): prompts fall into `lens_folds` folds by sha256(id), and each fold is probed
    with translators fitted on the other folds only, so no label comes from a translator that saw
    its prompt (fitted in-sample, the ridge maps overfit and train labels would look easier than
    held-out ones)."""
    n_layers, probe, decision = layers.n, layers.probe, layers.decision
    wanted = sorted(set(probe) | set(layers.read) | {decision - 1, n_layers})
    started = time.perf_counter()
    prompts = _hidden_states(backbone, rows, cfg, probe, wanted, progress)
    timing = {"hidden_states_s": time.perf_counter() - started, "probe_s": 0.0}
    folds = sorted({p["fold"] for p in prompts})
    if cfg.tuned_lens and len(folds) < 2:
        raise AGPError(f"cross-fitted tuned lens needs prompts in 2 or more of {cfg.lens_folds} folds; add prompts")
    hidden = {layer: np.concatenate([p["h"][layer] for p in prompts]) for layer in wanted}
    fold_of = np.concatenate([[p["fold"]] * len(p["pos"]) for p in prompts])
    stats, order = [], []
    with tqdm(total=len(fold_of), desc=f"probes ({len(probe)} layers x full head)", unit="pos",
              disable=not progress) as bar:
        for fold in folds:
            translators = None
            if cfg.tuned_lens:
                translators = _fit_translators([p for p in prompts if p["fold"] != fold], probe, n_layers,
                                               cfg.lens_ridge)
            in_fold = np.flatnonzero(fold_of == fold)
            probe_start = time.perf_counter()
            stats += probe_batches(backbone, hidden, in_fold, layers, translators, cfg.probe_batch, bar)
            timing["probe_s"] += time.perf_counter() - probe_start
            order += [in_fold[start:start + cfg.probe_batch] for start in range(0, len(in_fold), cfg.probe_batch)]
    timing.update(positions=len(fold_of), total_s=time.perf_counter() - started)
    back_to_input_order = np.argsort(np.concatenate(order))
    per_position = {k: np.concatenate([s[k] for s in stats], axis=-1)[..., back_to_input_order]
                    for k in PROBE_STATS}
    # the map saved for later stages: fitted on every prompt
    final_translators = _fit_translators(prompts, probe, n_layers, cfg.lens_ridge) if cfg.tuned_lens else None
    return Probes(**per_position, hidden=hidden,
                  split=np.concatenate([[p["row"]["split"]] * len(p["pos"]) for p in prompts]),
                  prompt=np.concatenate([[str(p["row"]["id"])] * len(p["pos"]) for p in prompts]),
                  position=np.concatenate([p["pos"] for p in prompts]),
                  translators=final_translators, timing=timing,
                  source=np.concatenate([[str(p["row"].get("source"))] * len(p["pos"]) for p in prompts]))


def measure_oracle_speed(backbone, probes: Probes, layers: Layers, cfg: ControllerArgs) -> dict:
    """Positions labelled per second by the probe pass, beside the bound its head matmuls set on
    this machine now (the same batch shape timed alone; agp.oracle.speed)."""
    from agp.oracle.speed import head_matmul_seconds

    timing = probes.timing
    bound_s = head_matmul_seconds(backbone, cfg.probe_batch, len(layers.probe), repeats=2)
    per_s = timing["positions"] / timing["probe_s"]
    return dict(timing, probe_positions_per_s=per_s,
                labelled_positions_per_s=timing["positions"] / timing["total_s"],
                bound_positions_per_s=cfg.probe_batch / bound_s,
                probe_over_bound=(cfg.probe_batch / bound_s) / per_s)


def probe_batches(backbone, hidden: dict, index: np.ndarray, layers: Layers, translators, batch: int,
                  bar=None) -> list[dict]:
    """probe_stats over the positions `index` in batches of `batch` (full statistics at D only)."""
    out = []
    for start in range(0, len(index), batch):
        rows = index[start:start + batch]
        out.append(probe_stats(backbone, {layer: hidden[layer][rows] for layer in layers.probe},
                               hidden[layers.n][rows], layers.probe, translators, full_layers=[layers.decision]))
        if bar is not None:
            bar.update(len(rows))
    return out


def _hidden_states(backbone, rows, cfg, probe, wanted, progress) -> list[dict]:
    """Per prompt: the probed positions, its lens fold, the hidden states at those positions and (for
    the tuned lens) at every position of the probe layers and the last layer."""
    n_layers = backbone.n_layers
    prompts = []
    for row in tqdm(rows, desc="hidden states", unit="prompt", disable=not progress):
        ids = backbone.encode(row["text"], max_tokens=cfg.max_tokens, truncate=True)
        if len(ids) < 2:
            continue
        states = hidden_at(backbone, ids, wanted, list(range(1, len(ids))))
        picked = [p - 1 for p in probe_positions(len(ids), cfg.positions)]   # index into positions 1..T-1
        fold = int(hashlib.sha256(str(row["id"]).encode()).hexdigest()[:8], 16) % max(cfg.lens_folds, 1)
        prompts.append({"row": row, "pos": np.asarray(picked) + 1, "fold": fold,
                        "h": {layer: v[picked] for layer, v in states.items()},
                        "all": {layer: states[layer] for layer in probe + [n_layers]} if cfg.tuned_lens else None})
    if not prompts:
        raise AGPError("no prompt had 2 or more tokens; the prompt source is empty")
    return prompts


def _fit_translators(prompts: list[dict], probe: list[int], n_layers: int, ridge: float) -> dict:
    final = np.concatenate([p["all"][n_layers] for p in prompts])
    return {layer: fit_translator(np.concatenate([p["all"][layer] for p in prompts]), final, ridge)
            for layer in probe}


@dataclass
class Labels:
    """Oracle labels for every position and the label-parameter sweep that chose their rule."""
    sweep: dict
    route: np.ndarray
    vitality: np.ndarray
    earliest: np.ndarray       # earliest acceptable layer
    earliest_cls: np.ndarray   # its index into Layers.exits
    index: dict                # split -> position indices


def label(probes: Probes, layers: Layers, cfg: ControllerArgs) -> Labels:
    """Sweep the label parameters on train, apply the chosen rule everywhere."""
    index = {s: np.flatnonzero(probes.split == s) for s in SPLITS}
    for split, positions in index.items():
        if len(positions) == 0:
            raise AGPError(f"the {split} split has no positions; add prompts (--controller-prompts)")
    train_ix = index["train"]
    swept = sweep(probes.kl[:, train_ix], probes.agree[:, train_ix], probes.teacher_margin[train_ix],
                  layers.probe, layers.decision, layers.n, cfg.min_stability)
    labelled = route_labels(probes.kl, probes.agree, probes.teacher_margin, layers.probe, layers.decision,
                            layers.n, LabelArgs(**swept["chosen"]))
    require_all_classes(labelled["route"][train_ix], ROUTES, "the train split's route labels")
    require_all_classes(labelled["vitality"][train_ix], VITALITY, "the train split's vitality labels")
    return Labels(swept, labelled["route"], labelled["vitality"], labelled["earliest"],
                  np.searchsorted(layers.exits, labelled["earliest"]), index)


@dataclass
class Heads:
    """The deployed three-head controller, the smaller variants it was compared with, and the ceiling."""
    features: np.ndarray       # [N, read layers x hidden], every position
    by_split: dict             # split -> features
    targets: dict              # split -> task -> labels
    controller: Controller
    training: dict
    variants: dict             # variant name -> held-out figures
    ceiling: dict              # information_ceiling()


VARIANTS = {"route": ["route"], "route+vitality": ["route", "vitality"], "route+vitality+earliest": list(TASKS)}


def train_heads(probes: Probes, labels: Labels, layers: Layers, cfg: ControllerArgs) -> Heads:
    features = np.concatenate([probes.hidden[layer] for layer in layers.read], axis=1)
    by_split = {s: features[ix] for s, ix in labels.index.items()}
    targets = {s: {"route": labels.route[ix], "vitality": labels.vitality[ix], "earliest": labels.earliest_cls[ix]}
               for s, ix in labels.index.items()}
    n_out = {"route": len(ROUTES), "vitality": len(VITALITY), "earliest": len(layers.exits)}
    trained, compared = {}, {}
    with tqdm(total=cfg.heads.steps * (len(VARIANTS) + 1), desc="controller heads", unit="step") as bar:
        ceiling = information_ceiling(by_split, targets, probes, labels.index, layers.probe.index(layers.decision),
                                      cfg.heads, bar)
        for variant, tasks in VARIANTS.items():
            head_args = HeadArgs.from_dict({**cfg.heads.to_dict(), "tasks": tasks})
            controller, info = train(by_split, targets, n_out, head_args, progress=bar)
            compared[variant] = _variant_figures(controller, info, by_split["heldout"], targets["heldout"])
            trained[variant] = (controller, info)
    controller, info = trained["route+vitality+earliest"]
    return Heads(features, by_split, targets, controller, info, compared, ceiling)


def _variant_figures(controller, info, features, targets) -> dict:
    logits = controller.logits(features)
    figures = {"route_macro_f1": per_class(targets["route"], logits["route"].argmax(1), ROUTES)["macro_f1"],
               "best_valid_route_macro_f1": info["best_valid_route_macro_f1"], "macs": controller.macs()}
    if "vitality" in logits:
        vitality = per_class(targets["vitality"], logits["vitality"].argmax(1), VITALITY)
        figures["vitality_macro_f1"] = vitality["macro_f1"]
    return figures


def information_ceiling(by_split, targets, probes: Probes, index, decision_row, head_args, bar=None) -> dict:
    """A route head on the hidden states plus the LM-head probe statistics at D (entropy, top-1
    probability, margin): signals the deployed heads may not pay for (each costs one pass through
    the vocabulary-wide head). Not deployable; it estimates (trained, so not a strict bound) what
    reading more of the state at D could buy: a class that stays low here is limited by its label,
    not by the controller's size."""
    extra = np.stack([getattr(probes, k)[decision_row] for k in ("entropy", "p1", "margin")], 1)
    widened = {s: np.concatenate([by_split[s], extra[ix]], 1) for s, ix in index.items()}
    head_args = HeadArgs.from_dict({**head_args.to_dict(), "tasks": ["route"]})
    controller, info = train(widened, targets, {"route": len(ROUTES)}, head_args, progress=bar)
    temperature = fit_temperature(controller.logits(widened["valid"])["route"], targets["valid"]["route"])
    probs = softmax(controller.logits(widened["heldout"])["route"], temperature)
    return {"features": "read layers + entropy, top-1 probability and margin of the tuned-lens probe at D",
            "route_argmax": per_class(targets["heldout"]["route"], probs.argmax(1), ROUTES),
            "recall_frontier_heldout": recall_frontier(probs, targets["heldout"]["route"]),
            "best_valid_route_macro_f1": info["best_valid_route_macro_f1"]}


@dataclass
class Calibration:
    """Temperatures per head, the route policy (thresholds, abstain gate) and its held-out figures."""
    tasks: dict                # task -> temperature, ECE / NLL before and after, held-out per-class figures
    thresholds: dict
    gate: float
    route_valid: np.ndarray    # calibrated route probabilities
    route_heldout: np.ndarray
    action: np.ndarray         # held-out policy actions
    confidence: np.ndarray
    policy: dict               # held-out per-class figures of the policy's actions
    recall_ci: dict
    frontier: dict
    abstain: dict
    earliest_logits: np.ndarray  # held-out earliest-layer head logits
    earliest_pred: np.ndarray  # held-out predicted earliest layer
    earliest_error: dict
    vitality_heldout: np.ndarray  # calibrated held-out vitality probabilities


def calibrate(heads: Heads, labels: Labels, probes: Probes, layers: Layers, cfg: ControllerArgs) -> Calibration:
    logits_valid = heads.controller.logits(heads.by_split["valid"])
    logits_heldout = heads.controller.logits(heads.by_split["heldout"])
    y_valid, y_heldout = heads.targets["valid"], heads.targets["heldout"]
    names = {"route": ROUTES, "vitality": VITALITY, "earliest": [str(e) for e in layers.exits]}
    tasks = {}
    for task in TASKS:
        temperature = fit_temperature(logits_valid[task], y_valid[task])
        before, after = softmax(logits_heldout[task]), softmax(logits_heldout[task], temperature)
        tasks[task] = {"temperature": temperature, "ece_before": ece(before, y_heldout[task]),
                       "ece_after": ece(after, y_heldout[task]), "nll_before": nll(before, y_heldout[task]),
                       "nll_after": nll(after, y_heldout[task]),
                       "heldout": per_class(y_heldout[task], after.argmax(1), names[task])}
    route_t = tasks["route"]["temperature"]
    route_valid, route_heldout = softmax(logits_valid["route"], route_t), softmax(logits_heldout["route"], route_t)
    thresholds = fit_thresholds(route_valid, y_valid["route"], cfg.policy)
    action_valid, action = decide(route_valid, thresholds), decide(route_heldout, thresholds)
    conf_valid, conf = confidence(route_valid, action_valid), confidence(route_heldout, action)
    gate = choose_gate(conf_valid, cfg.policy.min_acceptance)
    earliest_probs = softmax(logits_heldout["earliest"], tasks["earliest"]["temperature"])
    earliest_pred = np.asarray(layers.exits)[earliest_probs.argmax(1)]
    earliest_true = labels.earliest[labels.index["heldout"]]
    return Calibration(
        tasks, thresholds, gate, route_valid, route_heldout, action, conf,
        policy=per_class(y_heldout["route"], action, ROUTES),
        recall_ci=_policy_recall(y_heldout["route"], action, probes.prompt[labels.index["heldout"]]),
        frontier=recall_frontier(route_heldout, y_heldout["route"]),
        abstain=_abstain(conf, action == y_heldout["route"], gate),
        earliest_logits=logits_heldout["earliest"], earliest_pred=earliest_pred,
        earliest_error={"mean_abs_layer_error": float(np.abs(earliest_pred - earliest_true).mean()),
                        "exact": float((earliest_pred == earliest_true).mean())},
        vitality_heldout=softmax(logits_heldout["vitality"], tasks["vitality"]["temperature"]))


def _policy_recall(y, action, groups) -> dict:
    """Escalate and revive recall of the policy with prompt-bootstrap intervals."""
    recall_ci = {ROUTES[a]: bootstrap_recall(y, action, groups, a) for a in (ESC, REV)}
    # escalate is the deeper corrective path: a revive_local position sent there is not exited or
    # continued unchanged, so this is the share of revive positions that get *some* correction
    revive = y == REV
    recall_ci["revive_local"]["corrective_coverage"] = (float(np.isin(action[revive], [REV, ESC]).mean())
                                                        if revive.any() else None)
    return recall_ci


def _abstain(conf, correct, gate) -> dict:
    keep = conf >= gate
    return {"gate": gate, "acceptance": float(keep.mean()),
            "error_all": float(1 - correct.mean()),
            "error_accepted": float(1 - correct[keep].mean()) if keep.any() else None,
            "auroc_conf_correct": auroc(conf, correct),
            "sweep": gate_sweep(conf, correct)}


MIN_SOURCE_POSITIONS = 40   # a left-out source with fewer positions gives no per-class figure worth reading


def leave_one_source_out(probes: Probes, labels: Labels, heads: Heads, calibration: Calibration,
                         cfg: ControllerArgs) -> dict:
    """Generalisation inside the project: per source, a route head trained on the other sources'
    train split (best step chosen on their valid split) and scored on every position of the source
    it never saw, beside the deployed controller on that source's held-out positions."""
    out = {}
    head_args = HeadArgs.from_dict({**cfg.heads.to_dict(), "tasks": ["route"]})
    split, source = probes.split, probes.source
    heldout_source = source[labels.index["heldout"]]
    for name in sorted(set(source)):
        left = source == name
        train_ix, valid_ix = np.flatnonzero(~left & (split == "train")), np.flatnonzero(~left & (split == "valid"))
        if left.sum() < MIN_SOURCE_POSITIONS or len(valid_ix) == 0 or len(set(labels.route[train_ix])) < len(ROUTES):
            out[name] = {"skipped": f"{int(left.sum())} positions, or the other sources lack a class"}
            continue
        feats = {"train": heads.features[train_ix], "valid": heads.features[valid_ix]}
        targets = {"train": {"route": labels.route[train_ix]}, "valid": {"route": labels.route[valid_ix]}}
        controller, _ = train(feats, targets, {"route": len(ROUTES)}, head_args)
        pred = controller.logits(heads.features[left])["route"].argmax(1)
        mine = heldout_source == name
        out[name] = {"positions": int(left.sum()),
                     "left_out": per_class(labels.route[left], pred, ROUTES),
                     "in_distribution_heldout": per_class(heads.targets["heldout"]["route"][mine],
                                                          calibration.route_heldout[mine].argmax(1), ROUTES)}
    return out


@dataclass
class Baselines:
    """The comparison methods on the same labels: their exit scores, decision costs and figures."""
    scores: dict               # method -> exit score per position (higher: exit sooner)
    decision_macs: dict        # method -> MACs per decision
    results: dict              # method -> held-out figures


def compare_baselines(backbone, probes: Probes, labels: Labels, layers: Layers, heads: Heads,
                      cfg: ControllerArgs) -> Baselines:
    decision_row = layers.probe.index(layers.decision)
    k = len(ROUTES)
    index = labels.index
    y_train = labels.route[index["train"]]
    n_valid, n_heldout = len(index["valid"]), len(index["heldout"])
    scores = {"entropy-only": -probes.entropy[decision_row],
              "softmax-confidence (CALM)": probes.margin[decision_row],
              "hidden-saturation (CALM)": baselines.saturation(probes.hidden[layers.decision],
                                                               probes.hidden[layers.decision - 1])}
    head_cost = backbone.head_macs() + (backbone.hidden_size ** 2 if cfg.tuned_lens else 0)
    decision_macs = {"controller": heads.controller.macs(), "majority": 0, "entropy-only": head_cost,
                     "softmax-confidence (CALM)": head_cost, "hidden-saturation (CALM)": 3 * backbone.hidden_size,
                     "fixed-layer (exit at D)": 0}
    probs = {"majority": (baselines.majority_proba(y_train, n_valid, k),
                          baselines.majority_proba(y_train, n_heldout, k)),
             "fixed-layer (exit at D)": (baselines.constant_proba(0, n_valid, k),
                                         baselines.constant_proba(0, n_heldout, k))}
    for name, score in scores.items():
        rule = baselines.ScalarRule(k).fit(score[index["train"]], y_train)
        probs[name] = (rule.proba(score[index["valid"]]), rule.proba(score[index["heldout"]]))
    y_valid, y_heldout = heads.targets["valid"]["route"], heads.targets["heldout"]["route"]
    results = {}
    for name, (p_valid, p_heldout) in probs.items():
        temperature = fit_temperature(np.log(np.clip(p_valid, 1e-9, 1)), y_valid)
        calibrated = softmax(np.log(np.clip(p_heldout, 1e-9, 1)), temperature)
        results[name] = {"heldout": per_class(y_heldout, p_heldout.argmax(1), ROUTES),
                         "ece_before": ece(p_heldout, y_heldout), "ece_after": ece(calibrated, y_heldout),
                         "temperature": temperature, "macs_per_decision": decision_macs[name]}
    return Baselines(scores, decision_macs, results)


@dataclass
class Savings:
    curves: dict               # method -> points over its thresholds
    best: dict                 # method -> agreement target -> best point


def savings_curves(backbone, layer_macs, probes: Probes, labels: Labels, layers: Layers, heads: Heads,
                   calibration: Calibration, compared: Baselines, cfg: ControllerArgs) -> Savings:
    """Layer savings at equal top-1 agreement (held-out)."""
    heldout = labels.index["heldout"]
    n, decision = layers.n, layers.decision
    agree_at = {layer: probes.agree[i][heldout] for i, layer in enumerate(layers.probe)}
    agree_at[n] = np.ones(len(heldout), bool)
    full = sum(layer_macs) + backbone.head_macs()
    cumulative = np.concatenate([[0], np.cumsum(layer_macs)])

    def coster(decision_cost):
        return lambda exit_layer: 1 - (cumulative[exit_layer] + backbone.head_macs() + decision_cost).mean() / full
    controller_cost = coster(heads.controller.macs())
    curves = {"controller (accept head)": exit_curve(calibration.route_heldout[:, ACC], agree_at, decision, n,
                                                     controller_cost)}
    earliest_conf = softmax(calibration.earliest_logits, calibration.tasks["earliest"]["temperature"]).max(1)
    curves["controller (earliest head)"] = [
        _point(np.where(earliest_conf >= t, np.maximum(calibration.earliest_pred, decision), n), agree_at, n,
               controller_cost)
        for t in np.linspace(0, 1, 41)]
    for name, score in compared.scores.items():
        curves[name] = exit_curve(score[heldout], agree_at, decision, n, coster(compared.decision_macs[name]))
    curves["fixed-layer"] = [_point(np.full(len(heldout), layer), agree_at, n, coster(0)) for layer in layers.exits]
    oracle_point = _point(labels.earliest[heldout], agree_at, n, coster(0))
    best = {name: {str(t): best_at(c, t) for t in cfg.agree_targets} for name, c in curves.items()}
    best["oracle (ceiling)"] = {str(t): oracle_point for t in cfg.agree_targets}
    return Savings(curves, best)


def exit_curve(score: np.ndarray, agree_at: dict, d: int, n: int, cost) -> list[dict]:
    """For thresholds over `score` quantiles: exit at D where score >= t (else full depth);
    top-1 agreement with full depth, layer savings and net MAC savings (decision cost included)."""
    pts = []
    for t in np.unique(np.quantile(score, np.linspace(0, 1, 41))).tolist() + [np.inf]:
        ex = np.where(score >= t, d, n)
        pts.append(_point(ex, agree_at, n, cost))
    return pts


def _point(exit_layer: np.ndarray, agree_at: dict, n: int, cost) -> dict:
    agreed = np.array([agree_at[int(e)][i] for i, e in enumerate(exit_layer)])
    return {"agreement": float(agreed.mean()), "layer_savings": float(1 - exit_layer.mean() / n),
            "mac_savings": float(cost(exit_layer))}


def best_at(curve: list[dict], target: float) -> dict:
    ok = [p for p in curve if p["agreement"] >= target]
    return max(ok, key=lambda p: p["layer_savings"]) if ok else {"agreement": None, "layer_savings": None,
                                                                 "mac_savings": None}


def write_artifacts(out: Path, probes: Probes, labels: Labels, layers: Layers, heads: Heads,
                    calibration: Calibration) -> None:
    """heads/ (+ calibration.json), translators.npz, features.npz, oracle.npz, decisions.jsonl."""
    heads.controller.save(out / "heads")
    io.write_json(out / "heads" / "calibration.json",
                  {"temperatures": {t: calibration.tasks[t]["temperature"] for t in TASKS},
                   "thresholds": calibration.thresholds, "abstain_gate": calibration.gate, "exits": layers.exits,
                   "read_layers": layers.read, "decision_layer": layers.decision})
    if probes.translators:
        _write_npz(out / "translators.npz", compressed=False,
                   **{f"W{layer}": t.W for layer, t in probes.translators.items()},
                   **{f"b{layer}": t.b for layer, t in probes.translators.items()})
    # lets gates/benchmarks re-run the saved heads
    _write_npz(out / "features.npz", features=heads.features.astype(np.float32), split=probes.split,
               route=labels.route, vitality=labels.vitality, earliest=labels.earliest_cls)
    _write_npz(out / "oracle.npz", layers=np.asarray(layers.probe), decision=layers.decision, kl=probes.kl,
               agree=probes.agree, margin=probes.margin, entropy=probes.entropy,
               teacher_margin=probes.teacher_margin, route=labels.route, vitality=labels.vitality,
               earliest=labels.earliest, split=probes.split, prompt=probes.prompt, position=probes.position)
    io.write_jsonl(out / "decisions.jsonl", _decision_records(probes, labels, layers, calibration))


def _write_npz(path: Path, compressed: bool = True, **arrays) -> None:
    with io.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)


def _decision_records(probes: Probes, labels: Labels, layers: Layers, calibration: Calibration) -> list[dict]:
    """One held-out decision-and-confidence record per position."""
    vitality = calibration.vitality_heldout
    conf = calibration.confidence
    return [{"id": probes.prompt[j], "position": int(probes.position[j]), "decision_layer": layers.decision,
             "action": ROUTES[int(calibration.action[i])], "confidence": round(float(conf[i]), 4),
             "abstain": bool(conf[i] < calibration.gate), "vitality": VITALITY[int(vitality[i].argmax())],
             "vitality_confidence": round(float(vitality[i].max()), 4),
             "earliest_layer": int(calibration.earliest_pred[i]),
             "label": {"route": ROUTES[int(labels.route[j])], "vitality": VITALITY[int(labels.vitality[j])],
                       "earliest_layer": int(labels.earliest[j])}}
            for i, j in enumerate(labels.index["heldout"])]


def stage_metrics(run, out, cfg, prompts: Prompts, backbone, layer_macs, probes: Probes, labels: Labels,
                  layers: Layers, heads: Heads, calibration: Calibration, compared: Baselines, savings: Savings,
                  timings: dict) -> dict:
    """The stage's metrics dictionary (the manifest's record and the report's input)."""
    probe = layers.probe
    tuned_agree = {int(layer): float(probes.agree[i].mean()) for i, layer in enumerate(probe)}
    per_layer = (run.stage("baseline").get("metrics") or {}).get("per_layer") or {}
    raw_agree = {int(layer): float(a) for layer, a in zip(per_layer.get("layers", []), per_layer.get("top1_agree", []))
                 if layer in probe}
    index, cal = labels.index, calibration.tasks
    return {
        "config": cfg.to_dict(), "backbone": prompts.backbone, "adapter_dir": prompts.adapter_dir,
        "prompt_source": prompts.prompt_source, "prompts_topped_up": prompts.topped_up,
        "resplit_60_20_20": prompts.resplit, "model_fingerprint": backbone.fingerprint,
        "dataset": {"prompts": {s: len({p for p, sp in zip(probes.prompt, probes.split) if sp == s}) for s in SPLITS},
                    "positions": {s: int(len(ix)) for s, ix in index.items()},
                    "sha256_oracle": io.sha256_file(out / "oracle.npz")},
        "layers": {"probe": probe, "decision": layers.decision, "read": layers.read, "exits": layers.exits,
                   "tuned_lens_top1_agree": tuned_agree, "raw_lens_top1_agree_stage0": raw_agree},
        "labels": {"chosen": labels.sweep["chosen"], "why": labels.sweep["why"], "grid": labels.sweep["grid"],
                   "stability": labels.sweep["chosen_row"]["stability"],
                   "route_shares": {s: class_shares(labels.route[ix], ROUTES) for s, ix in index.items()},
                   "vitality_shares": {s: class_shares(labels.vitality[ix], VITALITY) for s, ix in index.items()},
                   "oracle_mean_earliest_layer": float(labels.earliest.mean())},
        "controller": {"route_argmax": cal["route"]["heldout"], "route_policy": calibration.policy,
                       "vitality": cal["vitality"]["heldout"], "earliest": cal["earliest"]["heldout"],
                       "earliest_layer_error": calibration.earliest_error, "thresholds": calibration.thresholds,
                       "calibration": {t: {k: v for k, v in cal[t].items() if k != "heldout"} for t in TASKS},
                       "abstain": calibration.abstain, "policy_recall_ci90_by_prompt": calibration.recall_ci,
                       "recall_frontier_heldout": calibration.frontier, "information_ceiling": heads.ceiling,
                       "macs_per_decision": heads.controller.macs(), "layer_macs": int(max(layer_macs)),
                       "head_macs": backbone.head_macs(), "training": heads.training, "variants": heads.variants},
        "baselines": compared.results, "savings": savings.best, "curves": savings.curves, "timings": timings,
    }


CONFIG = ControllerArgs  # the dataclass `agp run` makes this stage's flags and --config section from
