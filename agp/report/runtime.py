"""Stage `runtime` report fragment: benchmark table, exit-layer x V sweep, time profile, frontier plot."""
from __future__ import annotations

from agp import io


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def _prompts(m) -> str:
    return ", ".join(f"{p['name']} ({p['tokens']} tok)" for p in m["bench"]["prompts"])


def frontier_plot(table: list[dict], path, teacher=None) -> None:
    """Left: token agreement with full-depth greedy generation vs MACs per token (ratio to full
    depth), one point per benchmarked mode. Right: teacher-forced next-token top-1 on held-out
    positions vs MACs, along each method's sweep."""
    from agp.report.plots import plt, save
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {"exit:L": "tab:orange", "entropy": "tab:green", "routed": "tab:red", "full": "black"}
    for method in ("exit:L", "entropy", "routed", "full"):
        pts = sorted((p for p in (teacher or []) if p["method"] == method), key=lambda p: p["mac_ratio"])
        if pts:
            ax2.plot([p["mac_ratio"] for p in pts], [p["top1"] for p in pts], "o-", ms=4, color=colors[method], label=method)
            for p in pts:
                if p.get("calibrated"):
                    ax2.plot(p["mac_ratio"], p["top1"], "*", ms=14, color="tab:red", label="routed (calibrated gate)")
    ax2.set_xlabel("MACs per token / full depth")
    ax2.set_ylabel("teacher-forced top-1 agreement with full depth")
    ax2.set_ylim(-0.02, 1.05)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    ax2.set_title("Held-out positions (teacher forced), every sweep", fontsize=9)
    groups = {"exit:": ("s", "tab:orange"), "entropy": ("^", "tab:green"), "routed": ("*", "tab:red"),
              "speculative": ("D", "tab:blue"), "full": ("o", "black")}
    for row in table:
        if row["mode"] == "mlx_lm.generate" or row["mac_ratio_vs_full"] is None:
            continue
        marker, color = next((v for k, v in groups.items() if row["mode"].startswith(k)), ("x", "grey"))
        ax.plot(row["mac_ratio_vs_full"], row["agreement_vs_full"], marker, color=color, ms=9 if marker == "*" else 6)
        ax.annotate(row["mode"], (row["mac_ratio_vs_full"], row["agreement_vs_full"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("MACs per emitted token / full depth")
    ax.set_ylabel("token agreement with full-depth greedy")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("Quality vs compute (held-out prompts; up-left is better)", fontsize=9)
    save(fig, path)


def write_report(out, m: dict) -> None:
    frontier_plot(m["bench"]["table"], out / "frontier.png", m.get("teacher_forced", {}).get("points"))
    lines = ["## Stage runtime — generation modes measured against full depth\n",
             f"Backbone: {m['backbone']}. Prompts: {_prompts(m)}; "
             f"{m['config']['bench_new_tokens']} new tokens each, greedy. Ratios are within this run.\n",
             "| mode | tok/s vs mlx-lm (per prompt) | ms/token p50 / p95 | MACs vs full | weight reads vs full | "
             "mean layers | agreement vs full | identical | acceptance | tokens/round |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["bench"]["table"]:
        per = ", ".join(f"{v:.2f}" for v in r["tok_s_ratio_per_prompt"].values())
        lines.append(f"| {r['mode']} | {r['tok_s_ratio_vs_mlx_lm']:.2f} ({per}) | {_f(r['ms_per_token_p50'], '{:.0f}')} / "
                     f"{_f(r['ms_per_token_p95'], '{:.0f}')} | {_f(r['mac_ratio_vs_full'])} | {_f(r['read_ratio_vs_full'])} | "
                     f"{_f(r['mean_layers'], '{:.1f}')} | {r['agreement_vs_full']:.3f} | "
                     f"{sum(r['identical_vs_full'])}/{len(r['identical_vs_full'])} | {_f(r['acceptance'])} | "
                     f"{_f(r['tokens_per_round'], '{:.2f}')} |")
    lines += ["", "![frontier](frontier.png)", "",
              "### Exit heads: exit layer x shortlist size (held-out valid positions)\n",
              "| E | V | top-1 vs full: identity / ridge / distilled (kept) | coverage | KL (shortlist, kept) | exit head ms / MACs | full head ms |",
              "|---|---|---|---|---|---|---|"]
    for r in m["sweep"]:
        dist = r.get("distilled", {}).get("top1_agree")
        lines.append(f"| {r['layer']} | {r['vocab']} | {r['identity']['top1_agree']:.3f} / {r['ridge']['top1_agree']:.3f} / "
                     f"{_f(dist)} ({r['kept']}) | {r['final']['coverage']:.3f} | "
                     f"{r['final']['kl_shortlist']:.2f} | {r['exit_head_ms']:.1f} / {r['exit_head_macs'] / 1e6:.1f}M | "
                     f"{r['full_head_ms']:.1f} |")
    tf = m.get("teacher_forced")
    if tf:
        lines += ["", f"### Teacher-forced frontier ({tf['positions']} held-out positions)\n",
                  "| method | parameter | top-1 vs full | MACs vs full |", "|---|---|---|---|"]
        for p in tf["points"]:
            star = " (calibrated)" if p.get("calibrated") else ""
            lines.append(f"| {p['method']} | {_f(p['param'], '{:g}')}{star} | {p['top1']:.3f} | {p['mac_ratio']:.3f} |")
    ch = m["choice"]
    fd = m.get("feature_draft")
    if fd:
        depth = " / ".join(f"{x:.3f}" for x in fd["chain_top1_by_depth"])
        lines += ["", "### Feature draft head (EAGLE-style; valid prompts)\n",
                  f"{fd['train_pairs']} train pairs, {fd['valid_pairs']} valid: one-step top-1 vs full "
                  f"{fd['valid']['top1_agree']:.3f} (KL {fd['valid']['kl_shortlist']:.2f}, coverage "
                  f"{fd['valid']['coverage']:.3f}); top-1 at draft depth 1..K with its own states fed back: {depth}; "
                  f"{fd['draft_ms']:.1f} ms / {fd['draft_macs'] / 1e6:.1f}M MACs per draft."]
    lines += ["", "Drafts by the cost model (agp.train.draft.chain_table, chains measured on the valid prompts):", ""]
    for kind, r in ch.get("per_kind", {}).items():
        where = f" at E={r['layer']}" if r.get("layer") is not None else ""
        mark = " (chosen: `speculative`)" if kind == ch.get("kind", "exit") else ""
        lines.append(f"- {kind}{where}: gate {r['tau']:g}, at most {r['k']} drafts, {r['tokens_per_round']:.2f} "
                     f"tokens/round, acceptance {r['acceptance']:.2f}, expected {r['expected_speedup']:.2f}x{mark}")
    lines += ["", "### Time profile of one decode step (ms, best of 8)\n",
              "| " + " | ".join(m["bench"]["profile"]) + " |", "|" + "---|" * len(m["bench"]["profile"]),
              "| " + " | ".join(_f(v, "{:.1f}") for v in m["bench"]["profile"].values()) + " |", ""]
    io.write_text(out / "report.md", "\n".join(lines) + "\n")
