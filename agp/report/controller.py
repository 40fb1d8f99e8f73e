"""Stage-2 report fragment and plots: labels, controller vs baselines, calibration, savings.

`write_report` joins one function per section; each reads the stage's metrics dictionary.
"""
from __future__ import annotations

import numpy as np

from agp import io
from agp.calibrate.metrics import reliability
from agp.calibrate.temperature import softmax
from agp.oracle.labels import ROUTES


def write_report(out, m, probs, y, sweep_rows=()) -> None:
    """Write <run>/controller/report.md and its PNGs from the stage metrics `m`, the calibrated
    held-out route probabilities `probs`, their labels `y` and the label sweep's rows."""
    cal, abstain = m["controller"]["calibration"], m["controller"]["abstain"]
    _plots(out, m, cal, probs, y)
    sections = [_setup(m), _labels(m, sweep_rows), _route_decision(m, cal), _confusion(m),
                _vitality_and_earliest(m, cal), _abstain(m, abstain), _savings(m),
                _left_out(m), _oracle_speed(m),
                f"Stage time: {', '.join(f'{k} {v:.1f}' for k, v in m['timings'].items())} s.\n"]
    io.write_text(out / "report.md", "## Stage 2 — controller\n\n" + "\n".join(sections))


def _left_out(m) -> str:
    """Leave-one-source-out route macro-F1 beside the deployed controller on that source's held-out."""
    rows = []
    for name, r in (m.get("leave_one_source_out") or {}).items():
        if "skipped" in r:
            rows.append(f"| {name} | skipped: {r['skipped']} | | |")
            continue
        recalls = " ".join(f"{r['left_out']['classes'][a]['recall']:.2f}" for a in ROUTES)
        rows.append(f"| {name} | {r['positions']} | {r['left_out']['macro_f1']:.3f} ({recalls}) | "
                    f"{r['in_distribution_heldout']['macro_f1']:.3f} |")
    if not rows:
        return ""
    return ("### Generalisation: leave one source out\n\nRoute head (argmax) trained on every other source, "
            "scored on every position of the source it never saw; beside it the deployed controller on that "
            "source's held-out positions (in distribution). Recalls in the order " + ", ".join(ROUTES) + ".\n\n"
            "| left-out source | positions | macro-F1 left out (recalls) | macro-F1 in distribution |\n"
            "|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _oracle_speed(m) -> str:
    o = m.get("oracle_speed")
    if not o:
        return ""
    return (f"Oracle: {o['positions']} positions; probe pass {o['probe_positions_per_s']:.1f} positions/s against "
            f"a head-matmul bound of {o['bound_positions_per_s']:.1f} measured in this run "
            f"({o['probe_over_bound']:.2f}x the bound); hidden states {o['hidden_states_s']:.1f} s; "
            f"{o['labelled_positions_per_s']:.1f} positions/s labelled end to end.\n")


def _f(x, fmt="{:.3f}"):
    return "—" if x is None else fmt.format(x)


def _shares(shares: dict) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in shares.items())


def _setup(m) -> str:
    """Teacher, prompts, layers and the tuned lens against the raw logit lens."""
    layers = m["layers"]
    topped = (f", topped up with {m['prompts_topped_up']} from the same pack builder"
              if m["prompts_topped_up"] else "")
    resplit = "; re-split 60/20/20 by prompt" if m["resplit_60_20_20"] else ""
    lens = "tuned lens" if m["config"]["tuned_lens"] else "logit lens"
    raw = layers.get("raw_lens_top1_agree_stage0") or {}
    lens_rows = "\n".join(f"| {layer} | {_f(raw.get(layer, raw.get(str(layer))))} | {a:.3f} |"
                          for layer, a in layers["tuned_lens_top1_agree"].items())
    tuned = ", ".join(f"{k}: {v:.2f}" for k, v in layers["tuned_lens_top1_agree"].items())
    return f"""Teacher/backbone: **{m['backbone']}** (prompts: `{m['prompt_source']}`{topped}{resplit}).
Prompts train/valid/heldout: {m['dataset']['prompts']}; probed positions: {m['dataset']['positions']}.
Probe layers {layers['probe']} ({lens}), decision layer **{layers['decision']}**, heads read layers {layers['read']}.
Tuned-lens top-1 agreement per probe layer: {tuned}.

| probe layer | top-1 agreement, raw logit lens (stage 0 pack) | top-1 agreement, cross-fitted tuned lens (this stage) |
|---|---|---|
{lens_rows}
"""


def _labels(m, sweep_rows) -> str:
    """The chosen label rule, the class shares and the sweep table."""
    lab = m["labels"]
    sweep_table = "\n".join(
        f"| {r['params']['kl_accept']:.3g} | {r['params']['margin_delta']:.3g} | {r['params']['kl_dead']:.3g} | "
        + " | ".join(f"{r['route_shares'][a]:.2f}" for a in ROUTES)
        + f" | {r['vitality_min_share']:.3f} | {r['stability']:.3f} |"
        for r in sweep_rows)
    return f"""**Labels** (docs/labels.md): chosen {lab['chosen']} — {lab['why']}; label stability {lab['stability']:.3f}.
Route shares (train): {_shares(lab['route_shares']['train'])}. Held-out: {_shares(lab['route_shares']['heldout'])}.
Vitality shares (train): {_shares(lab['vitality_shares']['train'])}. Oracle mean earliest layer {lab['oracle_mean_earliest_layer']:.2f}.

<details><summary>Label sweep (train split; route shares, smallest vitality share, stability)</summary>

| kl_accept | margin_delta | kl_dead | {' | '.join(ROUTES)} | min vitality | stability |
|---|---|---|{'---|' * len(ROUTES)}---|---|
{sweep_table}

</details>
"""


def _route_decision(m, cal) -> str:
    """Controller vs baselines on the held-out route decision, the policy and its recall intervals."""
    c = m["controller"]
    route_cal = (cal["route"]["ece_before"], cal["route"]["ece_after"], c["macs_per_decision"])
    rows = [("**controller (3 heads, policy)**", c["route_policy"], *route_cal),
            ("controller (argmax)", c["route_argmax"], *route_cal)]
    rows += [(name, b["heldout"], b["ece_before"], b["ece_after"], b["macs_per_decision"])
             for name, b in m["baselines"].items()]
    table = "\n".join(
        f"| {name} | {r['macro_f1']:.3f} | {r['accuracy']:.3f} | "
        + " | ".join(f"{r['classes'][a]['recall']:.2f}" for a in ROUTES)
        + f" | {before:.3f} | {after:.3f} | {macs:,} |" for name, r, before, after, macs in rows)
    policy = m["config"]["policy"]
    thresholds = ", ".join(f"{k} {v:.2f}" for k, v in c["thresholds"].items())
    return f"""**Route decision on held-out** (recall per class; ECE 15 bins before/after temperature scaling; MACs per decision — one layer is {c['layer_macs']:,}, the LM head {c['head_macs']:,}):

| method | macro-F1 | accuracy | {' | '.join('recall ' + a for a in ROUTES)} | ECE before | ECE after | MACs/decision |
|---|---|---|{'---|' * len(ROUTES)}---|---|---|
{table}

Controller policy: per-action thresholds {thresholds} (escalate/revive for recall ≥ {policy['recall_target']}, accept for precision ≥ {policy['precision_target']} on valid).
Policy recall with 90% intervals from resampling held-out prompts: {_recall_ci_text(c)}.
{_frontier_text(c)}
"""


def _recall_ci_text(c) -> str:
    ci = c.get("policy_recall_ci90_by_prompt") or {}
    text = "; ".join(f"{a} {_f(v['recall'])} [{_f(v['lo'])}, {_f(v['hi'])}] ({v['support']} positions, "
                     f"{v['groups']} prompts)" for a, v in ci.items())
    if (ci.get("revive_local") or {}).get("corrective_coverage") is not None:
        text += f"; revive_local positions sent to revive or escalate: {ci['revive_local']['corrective_coverage']:.3f}"
    return text


def _frontier_text(c) -> str:
    """The safety-recall frontier and the information ceiling, in words."""
    frontier, ceiling = c.get("recall_frontier_heldout") or {}, c.get("information_ceiling") or {}
    if not frontier.get("best_balanced") or not ceiling:
        return ""
    best, ceiling_best = frontier["best_balanced"], ceiling["recall_frontier_heldout"]["best_balanced"]
    ceiling_route = ceiling["route_argmax"]
    return (f"**What is reachable.** Over every pair of escalate/revive thresholds, chosen on held-out itself "
            f"(an optimistic bound), the best balanced point is escalate {best['escalate_recall']:.2f} / revive "
            f"{best['revive_recall']:.2f}, flagging {best['flagged']:.0%} of positions. A route head that also reads the "
            f"LM-head probe statistics at D (entropy, top-1 probability, margin; not deployable, one "
            f"vocabulary-wide pass each) reaches argmax macro-F1 {ceiling_route['macro_f1']:.3f} (recall "
            + ", ".join(f"{a} {ceiling_route['classes'][a]['recall']:.2f}" for a in ROUTES)
            + f") and a best balanced point of escalate {ceiling_best['escalate_recall']:.2f} / revive "
            f"{ceiling_best['revive_recall']:.2f} "
            "(a trained estimate of the ceiling, not a strict bound): classes that stay low there are limited by "
            "what the state at D holds about the label, not by the controller's size.\n\n"
            "![safety frontier](controller/safety_frontier.png)")


def _confusion(m) -> str:
    rows = "\n".join(f"| {a} | " + " | ".join(str(v) for v in row) + " |"
                     for a, row in zip(ROUTES, m["controller"]["route_policy"]["confusion"]))
    return f"""Confusion (rows true, columns predicted {', '.join(ROUTES)}):

| true | {' | '.join(ROUTES)} |
|---|{'---|' * len(ROUTES)}
{rows}
"""


def _vitality_and_earliest(m, cal) -> str:
    c = m["controller"]
    vitality_recall = ", ".join(f"{k} {v['recall']:.2f}" for k, v in c["vitality"]["classes"].items())
    variants = "\n".join(f"| {k} | {v['route_macro_f1']:.3f} | {_f(v.get('vitality_macro_f1'))} | {v['macs']:,} |"
                         for k, v in c["variants"].items())
    err = c["earliest_layer_error"]
    return f"""Vitality head held-out macro-F1 {c['vitality']['macro_f1']:.3f} (recall {vitality_recall}); ECE {cal['vitality']['ece_before']:.3f} → {cal['vitality']['ece_after']:.3f}.
Earliest-layer head: macro-F1 {c['earliest']['macro_f1']:.3f}, mean |layer error| {err['mean_abs_layer_error']:.2f}, exact {err['exact']:.2f}.

Head variants (held-out route macro-F1, argmax):

| variant | route macro-F1 | vitality macro-F1 | MACs/decision |
|---|---|---|---|
{variants}
"""


def _abstain(m, abstain) -> str:
    return f"""**Abstain**: gate {abstain['gate']:.2f} (largest keeping ≥ {m['config']['policy']['min_acceptance']:.0%} of valid decisions): held-out acceptance {abstain['acceptance']:.1%}, error {abstain['error_all']:.3f} → {_f(abstain['error_accepted'])} among accepted; AUROC(confidence → correct) {_f(abstain['auroc_conf_correct'])}.

![reliability](controller/reliability.png) ![gate sweep](controller/gate_sweep.png)
"""


def _savings(m) -> str:
    rows = []
    for name, per_target in m["savings"].items():
        cells = " | ".join(f"{_f(v['layer_savings'], '{:.1%}')} / {_f(v['mac_savings'], '{:.1%}')} "
                           f"(agree {_f(v['agreement'])})" for v in per_target.values())
        rows.append(f"| {name} | {cells} |")
    targets = m["savings"]["oracle (ceiling)"]
    header = " | ".join(f"agreement ≥ {t}" for t in targets)
    return f"""**Layer savings / net MAC savings at equal top-1 agreement with full depth** (held-out; MAC savings include each method's decision cost and the final LM head):

| method | {header} |
|---|{'---|' * len(targets)}
{chr(10).join(rows)}

![savings](controller/savings.png)
"""


def _plots(out, m, cal, probs, y) -> None:
    from agp.report.plots import plt, save

    save(_reliability_plot(plt, cal, probs, y), out / "reliability.png")
    save(_gate_plot(plt, m), out / "gate_sweep.png")
    save(_savings_plot(plt, m), out / "savings.png")
    frontier = _frontier_plot(plt, m["controller"])
    if frontier:
        save(frontier, out / "safety_frontier.png")


def _label(ax, xlabel: str, ylabel: str, title: str, legend_size: int = 7) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)


def _reliability_plot(plt, cal, probs, y):
    """The route head's reliability diagram, before and after temperature scaling."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    temperature = cal["route"]["temperature"]
    uncalibrated = np.log(np.clip(probs, 1e-12, 1)) * temperature   # back to the uncalibrated logits' scale
    for p, label, colour in (
            (softmax(uncalibrated, 1.0), f"before (ECE {cal['route']['ece_before']:.3f})", "tab:red"),
            (probs, f"after T={temperature:.2f} (ECE {cal['route']['ece_after']:.3f})", "tab:blue")):
        r = reliability(p, y)
        ok = np.array(r["count"]) > 0
        ax.plot(np.array(r["conf"])[ok], np.array(r["acc"])[ok], "o-", color=colour, label=label)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    _label(ax, "confidence (15 bins)", "accuracy", "Route head reliability (held-out)")
    return fig


def _gate_plot(plt, m):
    abstain = m["controller"]["abstain"]
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.plot(abstain["sweep"]["acceptance"], abstain["sweep"]["error"], ".-")
    ax.plot([abstain["acceptance"]], [abstain["error_accepted"] or 0], "r*", ms=12,
            label=f"chosen gate {abstain['gate']:.2f}")
    _label(ax, "acceptance rate (decisions not abstained)", "error among accepted", "Confidence-gate sweep (held-out)")
    return fig


def _savings_plot(plt, m):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in m["curves"].items():
        pts = sorted(curve, key=lambda p: p["agreement"])
        ax.plot([p["agreement"] for p in pts], [p["layer_savings"] for p in pts], ".-", label=name)
    oracle = next(iter(m["savings"]["oracle (ceiling)"].values()))
    ax.plot([oracle["agreement"]], [oracle["layer_savings"]], "k*", ms=12, label="oracle (ceiling)")
    _label(ax, "top-1 agreement with full depth", "layer savings (fraction of layers skipped)",
           "Exit policies on held-out positions", legend_size=6)
    return fig


def _frontier_plot(plt, c):
    """Escalate vs revive recall over every threshold pair, for the controller and the ceiling."""
    if not c.get("recall_frontier_heldout", {}).get("points"):
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, frontier, colour in (
            ("controller (hidden states)", c["recall_frontier_heldout"], "tab:blue"),
            ("ceiling (+ LM-head statistics at D)", c["information_ceiling"]["recall_frontier_heldout"], "tab:grey")):
        pts = frontier["points"]
        ax.step([p["escalate_recall"] for p in pts], [p["revive_recall"] for p in pts], "-", where="post",
                color=colour, label=name)
    ci = c["policy_recall_ci90_by_prompt"]
    ax.plot([ci["escalate"]["recall"]], [ci["revive_local"]["recall"]], "r*", ms=12, label="deployed policy")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    _label(ax, "escalate recall", "revive_local recall", "Reachable safety recalls (held-out, every threshold pair)")
    return fig
