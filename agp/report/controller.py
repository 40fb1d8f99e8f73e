"""Stage-2 report fragment and plots: labels, controller vs baselines, calibration, savings."""
from __future__ import annotations

import numpy as np

from agp import io
from agp.calibrate.metrics import reliability
from agp.oracle.labels import ROUTES, VITALITY


def _plots(out, m, cal, probs, y):
    from agp.report.plots import plt, save

    # reliability diagram of the route head, before and after temperature scaling
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    T = cal["route"]["temperature"]
    logp = np.log(np.clip(probs, 1e-12, 1)) * T          # back to the uncalibrated logits' scale
    from agp.calibrate.temperature import softmax
    for p, lab, c in ((softmax(logp, 1.0), f"before (ECE {cal['route']['ece_before']:.3f})", "tab:red"),
                      (probs, f"after T={T:.2f} (ECE {cal['route']['ece_after']:.3f})", "tab:blue")):
        r = reliability(p, y)
        ok = np.array(r["count"]) > 0
        ax.plot(np.array(r["conf"])[ok], np.array(r["acc"])[ok], "o-", color=c, label=lab)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("confidence (15 bins)")
    ax.set_ylabel("accuracy")
    ax.set_title("Route head reliability (held-out)", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, out / "reliability.png")

    sw = m["controller"]["abstain"]["sweep"]
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.plot(sw["acceptance"], sw["error"], ".-")
    g = m["controller"]["abstain"]
    ax.plot([g["acceptance"]], [g["error_accepted"] or 0], "r*", ms=12, label=f"chosen gate {g['gate']:.2f}")
    ax.set_xlabel("acceptance rate (decisions not abstained)")
    ax.set_ylabel("error among accepted")
    ax.set_title("Confidence-gate sweep (held-out)", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, out / "gate_sweep.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, c in m["curves"].items():
        pts = sorted(c, key=lambda p: p["agreement"])
        ax.plot([p["agreement"] for p in pts], [p["layer_savings"] for p in pts], ".-", label=name)
    o = m["savings"]["oracle (ceiling)"]
    first = next(iter(o.values()))
    ax.plot([first["agreement"]], [first["layer_savings"]], "k*", ms=12, label="oracle (ceiling)")
    ax.set_xlabel("top-1 agreement with full depth")
    ax.set_ylabel("layer savings (fraction of layers skipped)")
    ax.set_title("Exit policies on held-out positions", fontsize=9)
    ax.legend(fontsize=6)
    save(fig, out / "savings.png")

    c = m["controller"]
    if c.get("recall_frontier_heldout", {}).get("points"):
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        for name, fr, col in (("controller (hidden states)", c["recall_frontier_heldout"], "tab:blue"),
                              ("ceiling (+ LM-head statistics at D)", c["information_ceiling"]["recall_frontier_heldout"], "tab:grey")):
            pts = fr["points"]
            ax.step([p["escalate_recall"] for p in pts], [p["revive_recall"] for p in pts], "-", where="post",
                    color=col, label=name)
        ci = c["policy_recall_ci90_by_prompt"]
        ax.plot([ci["escalate"]["recall"]], [ci["revive_local"]["recall"]], "r*", ms=12, label="deployed policy")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("escalate recall")
        ax.set_ylabel("revive_local recall")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_title("Reachable safety recalls (held-out, every threshold pair)", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, out / "safety_frontier.png")


def _f(x, fmt="{:.3f}"):
    return "—" if x is None else fmt.format(x)


def _frontier_text(c) -> str:
    """The safety-recall frontier and the information ceiling, in words."""
    fr, ce = c.get("recall_frontier_heldout") or {}, c.get("information_ceiling") or {}
    if not fr.get("best_balanced") or not ce:
        return ""
    b, cb = fr["best_balanced"], ce["recall_frontier_heldout"]["best_balanced"]
    cr = ce["route_argmax"]
    return (f"**What is reachable.** Over every pair of escalate/revive thresholds, chosen on held-out itself "
            f"(an optimistic bound), the best balanced point is escalate {b['escalate_recall']:.2f} / revive "
            f"{b['revive_recall']:.2f}, flagging {b['flagged']:.0%} of positions. A route head that also reads the "
            f"LM-head probe statistics at D (entropy, top-1 probability, margin; not deployable, one "
            f"vocabulary-wide pass each) reaches argmax macro-F1 {cr['macro_f1']:.3f} (recall "
            + ", ".join(f"{a} {cr['classes'][a]['recall']:.2f}" for a in ROUTES)
            + f") and a best balanced point of escalate {cb['escalate_recall']:.2f} / revive {cb['revive_recall']:.2f} "
            "(a trained estimate of the ceiling, not a strict bound): classes that stay low there are limited by "
            "what the state at D holds about the label, not by the controller's size.\n\n![safety frontier](controller/safety_frontier.png)")


def write_report(out, m, abstain, cal, probs, y, sweep_rows=()) -> None:
    """Write <run>/controller/report.md and its PNGs."""
    _plots(out, m, cal, probs, y)
    c = m["controller"]
    lab = m["labels"]
    rows = []
    ctl_row = ("**controller (3 heads, policy)**", c["route_policy"], cal["route"]["ece_before"], cal["route"]["ece_after"],
               c["macs_per_decision"])
    rows.append(ctl_row)
    rows.append(("controller (argmax)", c["route_argmax"], cal["route"]["ece_before"], cal["route"]["ece_after"],
                 c["macs_per_decision"]))
    for name, b in m["baselines"].items():
        rows.append((name, b["heldout"], b["ece_before"], b["ece_after"], b["macs_per_decision"]))
    table = "\n".join(
        f"| {n} | {r['macro_f1']:.3f} | {r['accuracy']:.3f} | " + " | ".join(f"{r['classes'][a]['recall']:.2f}" for a in ROUTES)
        + f" | {eb:.3f} | {ea:.3f} | {mac:,} |" for n, r, eb, ea, mac in rows)
    conf = "\n".join(f"| {a} | " + " | ".join(str(v) for v in row) + " |"
                     for a, row in zip(ROUTES, c["route_policy"]["confusion"]))
    sav_rows = []
    for name, s in m["savings"].items():
        cells = " | ".join(f"{_f(v['layer_savings'], '{:.1%}')} / {_f(v['mac_savings'], '{:.1%}')} (agree {_f(v['agreement'])})"
                           for v in s.values())
        sav_rows.append(f"| {name} | {cells} |")
    targets = " | ".join(f"agreement ≥ {t}" for t in m["savings"]["oracle (ceiling)"])
    var = "\n".join(f"| {k} | {v['route_macro_f1']:.3f} | {_f(v.get('vitality_macro_f1'))} | {v['macs']:,} |"
                    for k, v in m["controller"]["variants"].items())
    ci = c.get("policy_recall_ci90_by_prompt") or {}
    ci_txt = "; ".join(f"{a} {_f(v['recall'])} [{_f(v['lo'])}, {_f(v['hi'])}] ({v['support']} positions, {v['groups']} prompts)"
                       for a, v in ci.items())
    if (ci.get("revive_local") or {}).get("corrective_coverage") is not None:
        ci_txt += f"; revive_local positions sent to revive or escalate: {ci['revive_local']['corrective_coverage']:.3f}"
    shares = lambda d: ", ".join(f"{k} {v:.1%}" for k, v in d.items())  # noqa: E731
    raw = m["layers"].get("raw_lens_top1_agree_stage0") or {}
    lens_rows = "\n".join(f"| {l} | {_f(raw.get(l, raw.get(str(l))))} | {a:.3f} |"
                          for l, a in m["layers"]["tuned_lens_top1_agree"].items())
    sweep_tbl = "\n".join(
        f"| {r['params']['kl_accept']:.3g} | {r['params']['margin_delta']:.3g} | {r['params']['kl_dead']:.3g} | "
        + " | ".join(f"{r['route_shares'][a]:.2f}" for a in ROUTES) + f" | {r['vitality_min_share']:.3f} | {r['stability']:.3f} |"
        for r in sweep_rows)
    text = f"""## Stage 2 — controller

Teacher/backbone: **{m['backbone']}** (prompts: `{m['prompt_source']}`{', topped up with ' + str(m['prompts_topped_up']) + ' from the same pack builder' if m['prompts_topped_up'] else ''}{'; re-split 60/20/20 by prompt' if m['resplit_60_20_20'] else ''}).
Prompts train/valid/heldout: {m['dataset']['prompts']}; probed positions: {m['dataset']['positions']}.
Probe layers {m['layers']['probe']} ({'tuned lens' if m['config']['tuned_lens'] else 'logit lens'}), decision layer **{m['layers']['decision']}**, heads read layers {m['layers']['read']}.
Tuned-lens top-1 agreement per probe layer: {', '.join(f'{k}: {v:.2f}' for k, v in m['layers']['tuned_lens_top1_agree'].items())}.

| probe layer | top-1 agreement, raw logit lens (stage 0 pack) | top-1 agreement, cross-fitted tuned lens (this stage) |
|---|---|---|
{lens_rows}

**Labels** (docs/labels.md): chosen {lab['chosen']} — {lab['why']}; label stability {lab['stability']:.3f}.
Route shares (train): {shares(lab['route_shares']['train'])}. Held-out: {shares(lab['route_shares']['heldout'])}.
Vitality shares (train): {shares(lab['vitality_shares']['train'])}. Oracle mean earliest layer {lab['oracle_mean_earliest_layer']:.2f}.

<details><summary>Label sweep (train split; route shares, smallest vitality share, stability)</summary>

| kl_accept | margin_delta | kl_dead | {' | '.join(ROUTES)} | min vitality | stability |
|---|---|---|{'---|' * len(ROUTES)}---|---|
{sweep_tbl}

</details>

**Route decision on held-out** (recall per class; ECE 15 bins before/after temperature scaling; MACs per decision — one layer is {c['layer_macs']:,}, the LM head {c['head_macs']:,}):

| method | macro-F1 | accuracy | {' | '.join('recall ' + a for a in ROUTES)} | ECE before | ECE after | MACs/decision |
|---|---|---|{'---|' * len(ROUTES)}---|---|---|
{table}

Controller policy: per-action thresholds {', '.join(f'{k} {v:.2f}' for k, v in c['thresholds'].items())} (escalate/revive for recall ≥ {m['config']['policy']['recall_target']}, accept for precision ≥ {m['config']['policy']['precision_target']} on valid).
Policy recall with 90% intervals from resampling held-out prompts: {ci_txt}.
{_frontier_text(c)}

Confusion (rows true, columns predicted {', '.join(ROUTES)}):

| true | {' | '.join(ROUTES)} |
|---|{'---|' * len(ROUTES)}
{conf}

Vitality head held-out macro-F1 {c['vitality']['macro_f1']:.3f} (recall {', '.join(f"{k} {v['recall']:.2f}" for k, v in c['vitality']['classes'].items())}); ECE {cal['vitality']['ece_before']:.3f} → {cal['vitality']['ece_after']:.3f}.
Earliest-layer head: macro-F1 {c['earliest']['macro_f1']:.3f}, mean |layer error| {c['earliest_layer_error']['mean_abs_layer_error']:.2f}, exact {c['earliest_layer_error']['exact']:.2f}.

Head variants (held-out route macro-F1, argmax):

| variant | route macro-F1 | vitality macro-F1 | MACs/decision |
|---|---|---|---|
{var}

**Abstain**: gate {abstain['gate']:.2f} (largest keeping ≥ {m['config']['policy']['min_acceptance']:.0%} of valid decisions): held-out acceptance {abstain['acceptance']:.1%}, error {abstain['error_all']:.3f} → {_f(abstain['error_accepted'])} among accepted; AUROC(confidence → correct) {_f(abstain['auroc_conf_correct'])}.

![reliability](controller/reliability.png) ![gate sweep](controller/gate_sweep.png)

**Layer savings / net MAC savings at equal top-1 agreement with full depth** (held-out; MAC savings include each method's decision cost and the final LM head):

| method | {targets} |
|---|{'---|' * len(m['savings']['oracle (ceiling)'])}
{chr(10).join(sav_rows)}

![savings](controller/savings.png)

Stage time: {', '.join(f'{k} {v:.1f}' for k, v in m['timings'].items())} s.
"""
    io.write_text(out / "report.md", text)
