"""Stage 2 — controller: oracle labels, label sweep, three-head controller, baselines, calibration.

Teacher = the full-depth model: the adapter-tuned backbone on the stage-1 routing lane when the
adapter stage finished, else the base backbone on the stage-0 prompt pack (the manifest says which).
Rules: docs/labels.md. Outputs in <run>/controller/: oracle.npz (per-position probe stats and
labels), sweep.json, heads/ (three-head controller + temperatures + thresholds), translators.npz,
decisions.jsonl (held-out decision-and-confidence records), report.md + PNGs.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agp import argtypes, io
from agp.calibrate import metrics as M
from agp.calibrate import policy as P
from agp.calibrate.temperature import fit_temperature, softmax
from agp.config import ConfigMixin
from agp.errors import AGPError
from agp.heads import baselines as B
from agp.heads.controller import TASKS, HeadArgs, train
from agp.oracle import labels as L
from agp.oracle.probes import fit_translator, hidden_at, probe_stats
from agp.oracle.sweep import sweep

NAME = "controller"
MARKER = "stage2"
REQUIRES = ["baseline"]
SPLITS = ("train", "valid", "heldout")


@dataclass
class ControllerArgs(ConfigMixin):
    prompts: int = 120                # prompts used (source first, topped up from the same pack builder)
    max_tokens: int = 128             # each prompt truncated to this many tokens
    positions: int = 24               # probed positions per prompt (the full-width head is the cost)
    # 40 x 16 left 128 held-out positions from 8 prompts: per-class recall moved ~0.1 with one prompt.
    # Offline on the adapter backbone, 416 x 32 positions raised held-out route macro-F1 from ~0.45
    # to 0.60 with the same heads; 120 x 24 is what the CI budget affords (~3 min on 2 cores).
    probe_layers: list | None = None  # None: n/3, n/2, 2n/3, n-3, n-1
    decision_layer: int | None = None  # None: 2n/3
    read_layers: list | None = None   # hidden layers the heads read; None: n/3, n/2, decision
    tuned_lens: bool = True           # per-layer ridge translators before the head
    probe_batch: int = 64             # positions per head call (amortises reading the 262144-wide table)
    lens_folds: int = 4               # tuned-lens cross-fitting folds (by prompt)
    lens_ridge: float = 0.1           # residual translator ridge (standardised inputs). Cross-fitted on
                                      # 768 adapter-backbone positions, top-1 agreement at layers 6/9/12/15/17:
                                      # 0.35/0.41/0.57/0.73/0.86 at 0.1 vs 0.28/0.35/0.52/0.70/0.82 at 1.0, and
                                      # 0.28/0.33/0.46/0.62/0.63 for the old non-residual map (identity: 0.68 at 17)
    min_stability: float = 0.8
    heads: HeadArgs = field(default_factory=HeadArgs)
    policy: P.PolicyArgs = field(default_factory=P.PolicyArgs)
    agree_targets: tuple = (0.9, 0.95)


def add_arguments(p):
    d = ControllerArgs()
    p.add_argument("--controller-prompts", type=argtypes.positive_int(), default=d.prompts, metavar="N",
                   help=f"prompts labelled by the oracle (default {d.prompts}; split 60/20/20 by prompt)")
    p.add_argument("--controller-positions", type=argtypes.positive_int(), default=d.positions, metavar="N",
                   help=f"probed positions per prompt; each costs one 262144-wide head pass per probe layer (default {d.positions})")
    p.add_argument("--controller-layers", type=argtypes.int_list_text(0), default=None, metavar="L1,L2,...",
                   help="probe layers (default n/3, n/2, 2n/3, n-3, n-1); the decision layer must be one")
    p.add_argument("--controller-decision-layer", type=argtypes.non_negative_int(), default=None, metavar="D",
                   help="layer whose hidden state the controller decides at (default 2n/3); must be a probe "
                        "layer; the heads read n/3, n/2 and D")
    p.add_argument("--controller-steps", type=argtypes.positive_int(), default=d.heads.steps, metavar="N",
                   help=f"training steps per head variant (default {d.heads.steps})")


def default_layers(n: int) -> tuple[list[int], int]:
    """Probe layers and decision layer for an n-layer model."""
    probe = sorted({x for x in (n // 3, n // 2, 2 * n // 3, n - 3, n - 1) if 0 < x < n})
    return probe, 2 * n // 3


def _config(args) -> ControllerArgs:
    cfg = ControllerArgs(prompts=getattr(args, "controller_prompts", ControllerArgs.prompts),
                         positions=getattr(args, "controller_positions", ControllerArgs.positions))
    layers = getattr(args, "controller_layers", None)
    if layers:
        try:
            cfg.probe_layers = sorted({int(x) for x in str(layers).split(",")})
        except ValueError as e:
            raise AGPError(f"--controller-layers must be comma-separated integers, got '{layers}'") from e
    cfg.decision_layer = getattr(args, "controller_decision_layer", None)
    cfg.heads.steps = getattr(args, "controller_steps", cfg.heads.steps)
    return cfg


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise AGPError(f"missing {path}; run the stage that writes it first")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise AGPError(f"{path} line {i} is not JSON ({e.msg}); rerun the stage that wrote it") from e
        if not isinstance(r, dict) or not isinstance(r.get("text"), str) or "id" not in r:
            raise AGPError(f"{path} line {i} lacks 'id'/'text'; rerun the stage that wrote it")
        rows.append(r)
    return rows


def source(run, model_arg) -> dict:
    """Backbone and prompts: the adapter + routing lane when stage 1 finished, else base + baseline pack."""
    ad = run.stage("adapter")
    if ad.get("status") == "done":
        adir = (ad.get("artifacts") or {}).get("adapter_dir")
        if not adir or not Path(adir).exists():
            raise AGPError(f"adapter stage of {run.path} finished but its adapter_dir ({adir}) is missing; "
                           f"rerun `agp run --stage adapter`")
        lane = run.path / "adapter" / "data" / "routing"
        rows = []
        for s in SPLITS:
            rows += [dict(r, split=r.get("split", s)) for r in _read_jsonl(lane / f"{s}.jsonl")]
        return {"backbone": "adapter", "adapter_dir": str(adir), "prompt_source": "adapter/data/routing",
                "rows": rows, "resplit": False}
    run.require("baseline", NAME)
    rows = _read_jsonl(run.path / "baseline" / "prompts.jsonl")
    return {"backbone": "base", "adapter_dir": None, "prompt_source": "baseline/prompts.jsonl",
            "rows": rows, "resplit": True}


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


def collect(bb, rows, cfg, probe, d, read, progress=True) -> dict:
    """Hidden states and probe statistics for every prompt. Tuned-lens translators are cross-fitted
    (docs/labels.md): prompts fall into `lens_folds` folds by sha256(id), and each fold is probed
    with translators fitted on the other folds only, so no label comes from a translator that saw
    its prompt (fitted in-sample, the ridge maps overfit and train labels would look easier than
    held-out ones)."""
    from agp.train.baseline import probe_positions

    L_ = bb.n_layers
    want = sorted(set(probe) | set(read) | {d - 1, L_})
    per = []
    for r in tqdm(rows, desc="hidden states", unit="prompt", disable=not progress):
        ids = bb.encode(r["text"], max_tokens=cfg.max_tokens, truncate=True)
        if len(ids) < 2:
            continue
        h = hidden_at(bb, ids, want, list(range(1, len(ids))))
        pos = [p - 1 for p in probe_positions(len(ids), cfg.positions)]   # index into positions 1..T-1
        fold = int(hashlib.sha256(str(r["id"]).encode()).hexdigest()[:8], 16) % max(cfg.lens_folds, 1)
        per.append({"row": r, "pos": np.asarray(pos) + 1, "fold": fold, "h": {l: v[pos] for l, v in h.items()},
                    "all": {l: h[l] for l in probe + [L_]} if cfg.tuned_lens else None})
    if not per:
        raise AGPError("no prompt had 2 or more tokens; the prompt source is empty")
    folds = sorted({it["fold"] for it in per})
    if cfg.tuned_lens and len(folds) < 2:
        raise AGPError(f"cross-fitted tuned lens needs prompts in 2 or more of {cfg.lens_folds} folds; add prompts")
    H = {l: np.concatenate([it["h"][l] for it in per]) for l in want}
    fold_of = np.concatenate([[it["fold"]] * len(it["pos"]) for it in per])
    stats, order = [], []
    with tqdm(total=len(fold_of), desc=f"probes ({len(probe)} layers x full head)", unit="pos",
              disable=not progress) as bar:
        for k in folds:
            tr = None
            if cfg.tuned_lens:
                others = [it for it in per if it["fold"] != k]
                hf = np.concatenate([it["all"][L_] for it in others])
                tr = {l: fit_translator(np.concatenate([it["all"][l] for it in others]), hf, cfg.lens_ridge)
                      for l in probe}
            ix = np.flatnonzero(fold_of == k)
            for a in range(0, len(ix), cfg.probe_batch):
                sl = ix[a:a + cfg.probe_batch]
                stats.append(probe_stats(bb, {l: H[l][sl] for l in probe}, H[L_][sl], probe, tr, full_layers=[d]))
                order.append(sl)
                bar.update(len(sl))
    inv = np.argsort(np.concatenate(order))
    cat = lambda k: np.concatenate([s[k] for s in stats], axis=-1)[..., inv]  # noqa: E731
    data = {k: cat(k) for k in ("kl", "agree", "margin", "entropy", "p1", "teacher_margin", "teacher_entropy")}
    translators = None
    if cfg.tuned_lens:         # the map saved for later stages: fitted on every prompt
        hf = np.concatenate([it["all"][L_] for it in per])
        translators = {l: fit_translator(np.concatenate([it["all"][l] for it in per]), hf, cfg.lens_ridge)
                       for l in probe}
    data["hidden"] = H
    data["split"] = np.concatenate([[it["row"]["split"]] * len(it["pos"]) for it in per])
    data["prompt"] = np.concatenate([[str(it["row"]["id"])] * len(it["pos"]) for it in per])
    data["position"] = np.concatenate([it["pos"] for it in per])
    data["translators"] = translators
    return data


def exit_curve(score: np.ndarray, agree_at: dict, d: int, n: int, cost) -> list[dict]:
    """For thresholds over `score` quantiles: exit at D where score >= t (else full depth);
    top-1 agreement with full depth, layer savings and net MAC savings (decision cost included)."""
    pts = []
    for t in np.unique(np.quantile(score, np.linspace(0, 1, 41))).tolist() + [np.inf]:
        ex = np.where(score >= t, d, n)
        pts.append(_point(ex, agree_at, n, cost))
    return pts


def _point(exit_layer: np.ndarray, agree_at: dict, n: int, cost) -> dict:
    ag = np.array([agree_at[int(e)][i] for i, e in enumerate(exit_layer)])
    return {"agreement": float(ag.mean()), "layer_savings": float(1 - exit_layer.mean() / n),
            "mac_savings": float(cost(exit_layer))}


def best_at(curve: list[dict], target: float) -> dict:
    ok = [p for p in curve if p["agreement"] >= target]
    return max(ok, key=lambda p: p["layer_savings"]) if ok else {"agreement": None, "layer_savings": None,
                                                                 "mac_savings": None}


def run(run, args) -> dict:
    """Label, sweep, train, calibrate and compare; write the stage-2 artifacts."""
    from agp.backbone import load
    from agp.data.prompt_pack import PromptPackArgs, build_prompt_pack

    t_start = time.perf_counter()
    timings = {}
    cfg = _config(args)
    out = run.stage_dir(NAME)
    src = source(run, getattr(args, "model", None))
    rows = src.pop("rows")
    topped = 0
    if len(rows) < cfg.prompts:
        seen = {r["id"] for r in rows}
        extra = [r for r in build_prompt_pack(PromptPackArgs(per_source=cfg.prompts)) if r["id"] not in seen]
        topped = min(cfg.prompts - len(rows), len(extra))
        rows = rows + extra[:topped]
    if len(rows) > cfg.prompts:          # a hash-ordered sample keeps the source's mix of splits and kinds
        rows = sorted(rows, key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())[: cfg.prompts]
    rows, resplit = assign_splits(rows, src.pop("resplit"))
    bb = load(getattr(args, "model", None), adapter=src["adapter_dir"])
    n = bb.n_layers
    probe, d = default_layers(n)
    if cfg.probe_layers:
        probe = cfg.probe_layers
        if any(not 0 < l < n for l in probe):
            raise AGPError(f"--controller-layers must lie in 1..{n - 1}, got {probe}")
    d = cfg.decision_layer or d
    if d not in probe:
        raise AGPError(f"decision layer {d} is not among the probe layers {probe}; include it in --controller-layers")
    read = cfg.read_layers or sorted({x for x in (n // 3, n // 2, d) if 0 < x <= d})
    timings["load_s"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    data = collect(bb, rows, cfg, probe, d, read)
    timings["oracle_probes_s"] = time.perf_counter() - t0
    split = data["split"]
    idx = {s: np.flatnonzero(split == s) for s in SPLITS}
    for s, ix in idx.items():
        if len(ix) == 0:
            raise AGPError(f"the {s} split has no positions; add prompts (--controller-prompts)")

    # --- labels: sweep on train, chosen rule applied everywhere ----------------------------------
    tr = idx["train"]
    sw = sweep(data["kl"][:, tr], data["agree"][:, tr], data["teacher_margin"][tr], probe, d, n, cfg.min_stability)
    largs = L.LabelArgs(**sw["chosen"])
    lab = L.route_labels(data["kl"], data["agree"], data["teacher_margin"], probe, d, n, largs)
    L.require_all_classes(lab["route"][tr], L.ROUTES, "the train split's route labels")
    L.require_all_classes(lab["vitality"][tr], L.VITALITY, "the train split's vitality labels")
    exits = probe + [n]
    lab["earliest_cls"] = np.searchsorted(exits, lab["earliest"])
    io.write_json(out / "sweep.json", sw)

    # --- heads -----------------------------------------------------------------------------------
    feats = np.concatenate([data["hidden"][l] for l in read], axis=1)
    F = {s: feats[ix] for s, ix in idx.items()}
    Y = {s: {"route": lab["route"][ix], "vitality": lab["vitality"][ix], "earliest": lab["earliest_cls"][ix]}
         for s, ix in idx.items()}
    n_out = {"route": len(L.ROUTES), "vitality": len(L.VITALITY), "earliest": len(exits)}
    variants = {"route": ["route"], "route+vitality": ["route", "vitality"], "route+vitality+earliest": list(TASKS)}
    t0 = time.perf_counter()
    trained, compare = {}, {}
    with tqdm(total=cfg.heads.steps * (len(variants) + 1), desc="controller heads", unit="step") as bar:
        ceiling = information_ceiling(F, Y, data, idx, probe.index(d), cfg.heads, bar)
        for vname, tasks in variants.items():
            ha = HeadArgs.from_dict({**cfg.heads.to_dict(), "tasks": tasks})
            ctl, info = train(F, Y, n_out, ha, progress=bar)
            lg = ctl.logits(F["heldout"])
            compare[vname] = {"route_macro_f1": M.per_class(Y["heldout"]["route"], lg["route"].argmax(1), L.ROUTES)["macro_f1"],
                              "best_valid_route_macro_f1": info["best_valid_route_macro_f1"], "macs": ctl.macs()}
            if "vitality" in lg:
                compare[vname]["vitality_macro_f1"] = M.per_class(Y["heldout"]["vitality"], lg["vitality"].argmax(1), L.VITALITY)["macro_f1"]
            trained[vname] = (ctl, info)
    timings["heads_s"] = time.perf_counter() - t0
    ctl, info = trained["route+vitality+earliest"]
    layer_macs = bb.layer_macs(context=cfg.max_tokens // 2)
    if ctl.macs() > max(layer_macs):
        raise AGPError(f"controller costs {ctl.macs()} MACs per decision, over one layer's {max(layer_macs)}; "
                       f"shrink the heads or read fewer layers")

    # --- calibration -----------------------------------------------------------------------------
    lv, lh = ctl.logits(F["valid"]), ctl.logits(F["heldout"])
    yv, yh = Y["valid"], Y["heldout"]
    names = {"route": L.ROUTES, "vitality": L.VITALITY, "earliest": [str(e) for e in exits]}
    cal = {}
    for t in TASKS:
        T = fit_temperature(lv[t], yv[t])
        ph0, ph1 = softmax(lh[t]), softmax(lh[t], T)
        cal[t] = {"temperature": T, "ece_before": M.ece(ph0, yh[t]), "ece_after": M.ece(ph1, yh[t]),
                  "nll_before": M.nll(ph0, yh[t]), "nll_after": M.nll(ph1, yh[t]),
                  "heldout": M.per_class(yh[t], ph1.argmax(1), names[t])}
    Tr = cal["route"]["temperature"]
    pv, ph = softmax(lv["route"], Tr), softmax(lh["route"], Tr)
    th = P.fit_thresholds(pv, yv["route"], cfg.policy)
    act_v, act_h = P.decide(pv, th), P.decide(ph, th)
    conf_v, conf_h = P.confidence(pv, act_v), P.confidence(ph, act_h)
    gate = P.choose_gate(conf_v, cfg.policy.min_acceptance)
    correct_h = act_h == yh["route"]
    keep = conf_h >= gate
    policy_m = M.per_class(yh["route"], act_h, L.ROUTES)
    groups = data["prompt"][idx["heldout"]]
    recall_ci = {L.ROUTES[a]: M.bootstrap_recall(yh["route"], act_h, groups, a) for a in (P.ESC, P.REV)}
    # escalate is the deeper corrective path: a revive_local position sent there is not exited or
    # continued unchanged, so this is the share of revive positions that get *some* correction
    rev = yh["route"] == P.REV
    recall_ci["revive_local"]["corrective_coverage"] = (float(np.isin(act_h[rev], [P.REV, P.ESC]).mean())
                                                        if rev.any() else None)
    frontier = P.recall_frontier(ph, yh["route"])
    abstain = {"gate": gate, "acceptance": float(keep.mean()),
               "error_all": float(1 - correct_h.mean()),
               "error_accepted": float(1 - correct_h[keep].mean()) if keep.any() else None,
               "auroc_conf_correct": M.auroc(conf_h, correct_h),
               "sweep": P.gate_sweep(conf_h, correct_h)}
    e_pred = np.asarray(exits)[softmax(lh["earliest"], cal["earliest"]["temperature"]).argmax(1)]
    earliest_err = {"mean_abs_layer_error": float(np.abs(e_pred - data_e(lab, idx)).mean()),
                    "exact": float((e_pred == data_e(lab, idx)).mean())}

    # --- baselines on the same labels --------------------------------------------------------------
    di = probe.index(d)
    k = len(L.ROUTES)
    ytr = lab["route"][tr]
    scores = {"entropy-only": -data["entropy"][di], "softmax-confidence (CALM)": data["margin"][di],
              "hidden-saturation (CALM)": B.saturation(data["hidden"][d], data["hidden"][d - 1])}
    head_cost = bb.head_macs() + (bb.hidden_size ** 2 if cfg.tuned_lens else 0)
    decision_macs = {"controller": ctl.macs(), "majority": 0, "entropy-only": head_cost,
                     "softmax-confidence (CALM)": head_cost, "hidden-saturation (CALM)": 3 * bb.hidden_size,
                     "fixed-layer (exit at D)": 0}
    probs = {"majority": (B.majority_proba(ytr, len(idx["valid"]), k), B.majority_proba(ytr, len(idx["heldout"]), k)),
             "fixed-layer (exit at D)": (B.constant_proba(0, len(idx["valid"]), k), B.constant_proba(0, len(idx["heldout"]), k))}
    for name, s in scores.items():
        rule = B.ScalarRule(k).fit(s[tr], ytr)
        probs[name] = (rule.proba(s[idx["valid"]]), rule.proba(s[idx["heldout"]]))
    base = {}
    for name, (bv, bh) in probs.items():
        T = fit_temperature(np.log(np.clip(bv, 1e-9, 1)), yv["route"])
        bh1 = softmax(np.log(np.clip(bh, 1e-9, 1)), T)
        base[name] = {"heldout": M.per_class(yh["route"], bh.argmax(1), L.ROUTES), "ece_before": M.ece(bh, yh["route"]),
                      "ece_after": M.ece(bh1, yh["route"]), "temperature": T, "macs_per_decision": decision_macs[name]}

    # --- layer savings at equal top-1 agreement (held-out) ------------------------------------------
    hi = idx["heldout"]
    agree_at = {l: data["agree"][i][hi] for i, l in enumerate(probe)}
    agree_at[n] = np.ones(len(hi), bool)
    full = sum(layer_macs) + bb.head_macs()
    cum = np.concatenate([[0], np.cumsum(layer_macs)])

    def coster(dm):
        return lambda ex: 1 - (cum[ex] + bb.head_macs() + dm).mean() / full
    curves = {"controller (accept head)": exit_curve(ph[:, P.ACC], agree_at, d, n, coster(ctl.macs()))}
    e_conf = softmax(lh["earliest"], cal["earliest"]["temperature"]).max(1)
    curves["controller (earliest head)"] = [
        _point(np.where(e_conf >= t, np.maximum(e_pred, d), n), agree_at, n, coster(ctl.macs()))
        for t in np.linspace(0, 1, 41)]
    for name in scores:
        curves[name] = exit_curve(scores[name][hi], agree_at, d, n, coster(decision_macs[name]))
    curves["fixed-layer"] = [_point(np.full(len(hi), l), agree_at, n, coster(0)) for l in probe + [n]]
    oracle_pt = _point(lab["earliest"][hi], agree_at, n, coster(0))
    savings = {name: {str(t): best_at(c, t) for t in cfg.agree_targets} for name, c in curves.items()}
    savings["oracle (ceiling)"] = {str(t): oracle_pt for t in cfg.agree_targets}

    # --- artifacts ---------------------------------------------------------------------------------
    ctl.save(out / "heads")
    io.write_json(out / "heads" / "calibration.json", {"temperatures": {t: cal[t]["temperature"] for t in TASKS},
                                                       "thresholds": th, "abstain_gate": gate, "exits": exits,
                                                       "read_layers": read, "decision_layer": d})
    if data["translators"]:
        with io.atomic_path(out / "translators.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{f"W{l}": tr_.W for l, tr_ in data["translators"].items()},
                         **{f"b{l}": tr_.b for l, tr_ in data["translators"].items()})
    with io.atomic_path(out / "features.npz") as tmp:     # lets gates/benchmarks re-run the saved heads
        with open(tmp, "wb") as f:
            np.savez_compressed(f, features=feats.astype(np.float32), split=split, route=lab["route"],
                                vitality=lab["vitality"], earliest=lab["earliest_cls"])
    with io.atomic_path(out / "oracle.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, layers=np.asarray(probe), decision=d, kl=data["kl"], agree=data["agree"],
                                margin=data["margin"], entropy=data["entropy"],
                                teacher_margin=data["teacher_margin"], route=lab["route"],
                                vitality=lab["vitality"], earliest=lab["earliest"], split=split,
                                prompt=data["prompt"], position=data["position"])
    pv_h = softmax(lh["vitality"], cal["vitality"]["temperature"])
    recs = [{"id": data["prompt"][j], "position": int(data["position"][j]), "decision_layer": d,
             "action": L.ROUTES[int(act_h[i])], "confidence": round(float(conf_h[i]), 4),
             "abstain": bool(conf_h[i] < gate), "vitality": L.VITALITY[int(pv_h[i].argmax())],
             "vitality_confidence": round(float(pv_h[i].max()), 4), "earliest_layer": int(e_pred[i]),
             "label": {"route": L.ROUTES[int(lab["route"][j])], "vitality": L.VITALITY[int(lab["vitality"][j])],
                       "earliest_layer": int(lab["earliest"][j])}} for i, j in enumerate(hi)]
    io.write_jsonl(out / "decisions.jsonl", recs)

    per_layer_agree = {int(l): float(data["agree"][i].mean()) for i, l in enumerate(probe)}
    pl = (run.stage("baseline").get("metrics") or {}).get("per_layer") or {}
    raw_agree = {int(l): float(a) for l, a in zip(pl.get("layers", []), pl.get("top1_agree", [])) if l in probe}
    metrics = {
        "config": cfg.to_dict(), "backbone": src["backbone"], "adapter_dir": src["adapter_dir"],
        "prompt_source": src["prompt_source"], "prompts_topped_up": topped, "resplit_60_20_20": resplit,
        "model_fingerprint": bb.fingerprint,
        "dataset": {"prompts": {s: len({p for p, sp in zip(data["prompt"], split) if sp == s}) for s in SPLITS},
                    "positions": {s: int(len(ix)) for s, ix in idx.items()},
                    "sha256_oracle": io.sha256_file(out / "oracle.npz")},
        "layers": {"probe": probe, "decision": d, "read": read, "exits": exits,
                   "tuned_lens_top1_agree": per_layer_agree, "raw_lens_top1_agree_stage0": raw_agree},
        "labels": {"chosen": sw["chosen"], "why": sw["why"], "grid": sw["grid"],
                   "stability": sw["chosen_row"]["stability"],
                   "route_shares": {s: L.class_shares(lab["route"][ix], L.ROUTES) for s, ix in idx.items()},
                   "vitality_shares": {s: L.class_shares(lab["vitality"][ix], L.VITALITY) for s, ix in idx.items()},
                   "oracle_mean_earliest_layer": float(lab["earliest"].mean())},
        "controller": {"route_argmax": cal["route"]["heldout"], "route_policy": policy_m,
                       "vitality": cal["vitality"]["heldout"], "earliest": cal["earliest"]["heldout"],
                       "earliest_layer_error": earliest_err, "thresholds": th,
                       "calibration": {t: {k2: v for k2, v in cal[t].items() if k2 != "heldout"} for t in TASKS},
                       "abstain": abstain, "policy_recall_ci90_by_prompt": recall_ci,
                       "recall_frontier_heldout": frontier, "information_ceiling": ceiling, "macs_per_decision": ctl.macs(), "layer_macs": int(max(layer_macs)),
                       "head_macs": bb.head_macs(), "training": info, "variants": compare},
        "baselines": base, "savings": savings, "curves": curves, "timings": timings,
    }
    timings["before_report_s"] = time.perf_counter() - t_start
    from agp.report.controller import write_report
    write_report(out, metrics, abstain, cal, ph, yh["route"], sw["rows"])
    timings["total_s"] = time.perf_counter() - t_start
    run.manifest.setdefault("datasets", {})["controller/oracle.npz"] = metrics["dataset"]["sha256_oracle"]
    run.update_stage(NAME, artifacts={"heads_dir": str(out / "heads"), "oracle": str(out / "oracle.npz"),
                                      "decisions": str(out / "decisions.jsonl")})
    return _clean(metrics)


def information_ceiling(F, Y, data, idx, di, head_args, bar=None) -> dict:
    """A route head on the hidden states plus the LM-head probe statistics at D (entropy, top-1
    probability, margin): signals the deployed heads may not pay for (each costs one pass through
    the vocabulary-wide head). Not deployable; it estimates (trained, so not a strict bound) what
    reading more of the state at D could buy: a class that stays low here is limited by its label,
    not by the controller's size."""
    extra = np.stack([data[k][di] for k in ("entropy", "p1", "margin")], 1)
    Fc = {s: np.concatenate([F[s], extra[ix]], 1) for s, ix in idx.items()}
    ha = HeadArgs.from_dict({**head_args.to_dict(), "tasks": ["route"]})
    ctl, info = train(Fc, Y, {"route": len(L.ROUTES)}, ha, progress=bar)
    T = fit_temperature(ctl.logits(Fc["valid"])["route"], Y["valid"]["route"])
    ph = softmax(ctl.logits(Fc["heldout"])["route"], T)
    return {"features": "read layers + entropy, top-1 probability and margin of the tuned-lens probe at D",
            "route_argmax": M.per_class(Y["heldout"]["route"], ph.argmax(1), L.ROUTES),
            "recall_frontier_heldout": P.recall_frontier(ph, Y["heldout"]["route"]),
            "best_valid_route_macro_f1": info["best_valid_route_macro_f1"]}


def data_e(lab, idx):
    return lab["earliest"][idx["heldout"]]


def _clean(o):
    """JSON-safe metrics: NaN -> None, numpy -> python."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o
