"""`agp eval controller`: how a run's deployed controller does on text it never saw.

The user's prompts are labelled exactly as the stage labelled its own (the run's backbone and
adapter, its probe and decision layers, its tuned-lens translators fitted on every stage prompt,
its chosen label rule, positions per prompt and truncation), then the deployed heads decide with
the run's temperatures, thresholds and abstain gate. The table puts the figures beside the run's
own held-out ones, so "how does this controller do on my text?" is one command.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agp import io
from agp.calibrate.metrics import bootstrap_recall, per_class
from agp.calibrate.policy import ESC, REV
from agp.errors import AGPError
from agp.heads.controller import load_deployed, route_decisions
from agp.oracle.labels import ROUTES, LabelArgs, class_shares, route_labels
from agp.oracle.probes import Translator
from agp.train import controller as stage

MIN_POSITIONS = 20      # fewer labelled positions than this say nothing about per-class recall


@dataclass
class Settings:
    """What the run's controller stage used, read back from the run."""
    cfg: stage.ControllerArgs
    layers: stage.Layers
    rule: LabelArgs
    translators: dict | None
    heads_dir: Path
    model: str | None
    adapter_dir: str | None
    fingerprint: str | None
    heldout: dict            # the stage's own held-out figures, for the side-by-side table


def settings(run) -> Settings:
    """The controller stage's settings; one-line refusals for a run that lacks them."""
    record = run.require("controller", "agp eval controller")
    metrics = record.get("metrics") or {}
    out = run.stage_dir("controller")
    for name in ("sweep.json", "heads"):
        if not (out / name).exists():
            raise AGPError(f"{out / name} is missing; rerun `agp run --stage controller --run-dir {run.path}`")
    import warnings
    with warnings.catch_warnings():   # a run made by newer code may carry keys this code ignores
        warnings.simplefilter("ignore")
        cfg = stage.ControllerArgs.from_dict(metrics.get("config") or {})
    lay = metrics.get("layers") or {}
    layers = stage.Layers(n=int(lay["exits"][-1]), probe=list(lay["probe"]), decision=int(lay["decision"]),
                          read=list(lay["read"]), exits=list(lay["exits"]))
    chosen = _read_rule(out / "sweep.json")
    translators = _read_translators(out / "translators.npz", layers.probe) if cfg.tuned_lens else None
    model = (run.manifest.get("config") or {}).get("model")
    return Settings(cfg, layers, chosen, translators, out / "heads", model,
                    _adapter(run, metrics), metrics.get("model_fingerprint"),
                    {"route_argmax": (metrics.get("controller") or {}).get("route_argmax"),
                     "route_policy": (metrics.get("controller") or {}).get("route_policy"),
                     "shares": ((metrics.get("labels") or {}).get("route_shares") or {}).get("heldout"),
                     "positions": ((metrics.get("dataset") or {}).get("positions") or {}).get("heldout")})


def _adapter(run, metrics: dict) -> str | None:
    """The adapter the stage's teacher used (resolved against the run, wherever it now lies)."""
    if metrics.get("backbone") != "adapter":
        return None
    path = run.artifact("adapter", "adapter_dir")
    if not path or not path.exists():
        raise AGPError(f"the run's adapter ({path}) is missing; rerun `agp run --stage adapter --run-dir {run.path}`")
    return str(path)


def _read_rule(path: Path) -> LabelArgs:
    import json
    try:
        return LabelArgs(**json.loads(path.read_text())["chosen"])
    except (ValueError, KeyError, TypeError) as e:
        raise AGPError(f"{path} is not a label sweep with a chosen rule ({e}); rerun `agp run --stage controller`")


def _read_translators(path: Path, probe: list[int]) -> dict:
    if not path.exists():
        raise AGPError(f"{path} is missing; rerun `agp run --stage controller`")
    with np.load(path) as z:
        missing = [layer for layer in probe if f"W{layer}" not in z]
        if missing:
            raise AGPError(f"{path} has no translator for probe layers {missing}; rerun `agp run --stage controller`")
        out = {layer: Translator(z[f"W{layer}"], z[f"b{layer}"]) for layer in probe}
    for layer, t in out.items():
        if not (np.isfinite(t.W).all() and np.isfinite(t.b).all()):
            raise AGPError(f"{path}: the layer-{layer} translator holds NaN/inf; rerun `agp run --stage controller`")
    return out


def read_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows {id, text, source} of a JSONL file of objects with a "text" string (id and source optional)."""
    path = Path(path)
    if not path.is_file():
        raise AGPError(f"prompt file {path} does not exist or is not a file; give a JSONL file with one "
                       f'{{"text": ...}} object per line')
    rows = []
    for i, row in enumerate(io.read_jsonl(path, 'each line must be a JSON object with a "text" string')):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise AGPError(f'{path} row {i + 1} has no "text" string; each line needs {{"text": "..."}}')
        rows.append({"id": str(row.get("id", f"{path.name}:{i + 1}")), "text": row["text"],
                     "source": str(row.get("source", "user")), "split": "heldout"})
    if not rows:
        raise AGPError(f"{path} holds no prompts")
    return rows[:limit] if limit else rows


@dataclass
class Labelled:
    probes: stage.Probes
    route: np.ndarray


def label(backbone, rows: list[dict], s: Settings, progress: bool = True) -> Labelled:
    """The stage's oracle on the user's prompts, with the run's translators (no refit)."""
    wanted = sorted(set(s.layers.probe) | set(s.layers.read) | {s.layers.decision - 1, s.layers.n})
    capture = dataclasses.replace(s.cfg, tuned_lens=False)    # translators come from the run
    prompts = stage._hidden_states(backbone, rows, capture, s.layers.probe, wanted, progress)
    hidden = {layer: np.concatenate([p["h"][layer] for p in prompts]) for layer in wanted}
    n = len(hidden[s.layers.n])
    if n < MIN_POSITIONS:
        raise AGPError(f"only {n} positions to label (need {MIN_POSITIONS}); give more or longer prompts")
    with tqdm(total=n, desc="oracle labels", unit="pos", disable=not progress) as bar:
        stats = stage.probe_batches(backbone, hidden, np.arange(n), s.layers, s.translators, s.cfg.probe_batch, bar)
    got = {k: np.concatenate([b[k] for b in stats], axis=-1) for k in stage.PROBE_STATS}
    probes = stage.Probes(**got, hidden=hidden, split=np.full(n, "heldout"),
                          prompt=np.concatenate([[p["row"]["id"]] * len(p["pos"]) for p in prompts]),
                          position=np.concatenate([p["pos"] for p in prompts]), translators=s.translators)
    route = route_labels(probes.kl, probes.agree, probes.teacher_margin, s.layers.probe, s.layers.decision,
                         s.layers.n, s.rule)["route"]
    return Labelled(probes, route)


def score(labelled: Labelled, s: Settings) -> dict:
    """The stage report's held-out figures, on the user's positions."""
    controller, calibration = load_deployed(s.heads_dir)
    features = np.concatenate([labelled.probes.hidden[layer] for layer in s.layers.read], axis=1)
    decided = route_decisions(controller, calibration, features)
    y, groups = labelled.route, labelled.probes.prompt
    keep = ~decided["abstain"]
    return {"positions": int(len(y)), "prompts": int(len(set(groups))),
            "route_shares": class_shares(y, ROUTES),
            "route_argmax": per_class(y, decided["probs"].argmax(1), ROUTES),
            "route_policy": per_class(y, decided["action"], ROUTES),
            "policy_recall_ci90_by_prompt": {ROUTES[a]: bootstrap_recall(y, decided["action"], groups, a)
                                             for a in (ESC, REV)},
            "abstain": {"gate": calibration["abstain_gate"], "acceptance": float(keep.mean()),
                        "error_accepted": (float((decided["action"][keep] != y[keep]).mean())
                                           if keep.any() else None)}}


def evaluate(run, prompts_path, model: str | None = None, limit: int | None = None, progress=True) -> dict:
    """Label the prompts with the run's oracle settings and score its deployed controller."""
    from agp.backbone import load

    s = settings(run)
    rows = read_prompts(prompts_path, limit)
    backbone = load(model or s.model, adapter=s.adapter_dir)
    if s.fingerprint and backbone.fingerprint != s.fingerprint:
        raise AGPError(f"the run's controller was made on backbone {s.fingerprint[:12]}, this one is "
                       f"{backbone.fingerprint[:12]}; evaluate with the run's --model, or rerun the stage")
    labelled = label(backbone, rows, s, progress)
    figures = score(labelled, s)
    return {"run": str(run.path), "prompts_file": str(prompts_path),
            "prompts_sha256": io.sha256_file(prompts_path), "label_rule": dataclasses.asdict(s.rule),
            "decision_layer": s.layers.decision, "yours": figures, "run_heldout": s.heldout}


def table(result: dict) -> str:
    """Markdown: your prompts beside the run's own held-out split."""
    yours, theirs = result["yours"], result["run_heldout"]
    head = ("| positions | argmax macro-F1 | policy macro-F1 | "
            + " | ".join(f"{r} recall (policy)" for r in ROUTES) + " |")
    lines = [head, "|---" * (3 + len(ROUTES)) + "|"]
    for name, f in (("your prompts", yours), ("run's held-out split", theirs)):
        argmax, policy = f.get("route_argmax"), f.get("route_policy")
        if not argmax or not policy:
            continue
        recalls = " | ".join(f"{policy['classes'][r]['recall']:.2f}" for r in ROUTES)
        lines.append(f"| {name}: {f.get('positions')} | {argmax['macro_f1']:.3f} | {policy['macro_f1']:.3f} | {recalls} |")
    shares = ", ".join(f"{k} {v:.0%}" for k, v in yours["route_shares"].items())
    ci = yours["policy_recall_ci90_by_prompt"]
    intervals = "; ".join(f"{k} recall {v.get('recall', float('nan')):.2f} (90% CI {v.get('lo', float('nan')):.2f}-"
                          f"{v.get('hi', float('nan')):.2f}, by prompt)" for k, v in ci.items())
    abstain = yours["abstain"]
    return "\n".join(lines) + (f"\n\nYour labels: {shares} ({yours['prompts']} prompts). {intervals}. "
                               f"Abstain gate {abstain['gate']:.2f} keeps {abstain['acceptance']:.0%} of decisions.\n")

