"""Stage `depth` report fragment: the ablation table and plot per candidate block, the revive table."""
from __future__ import annotations

from agp import io


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def ablation_plot(rows: list[dict], layer: int, path) -> None:
    """Mean KL to full depth (bars, log scale) and top-1 / acceptable share (points) per variant."""
    from agp.report.plots import plt, save
    mine = [r for r in rows if r["layer"] == layer]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = range(len(mine))
    ax.bar(x, [r["kl"] for r in mine], color="tab:red", alpha=0.6)
    ax.set_yscale("log")
    ax.set_ylabel("mean KL(full depth || variant), nats", color="tab:red")
    ax.set_xticks(list(x), [r["variant"] for r in mine], fontsize=7, rotation=15)
    ax2 = ax.twinx()
    ax2.plot(x, [r["top1"] for r in mine], "s-", color="tab:blue", label="top-1 agreement")
    ax2.plot(x, [r["acceptable"] for r in mine], "^--", color="tab:green", label="acceptable (label rule)")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=7, loc="upper left")
    ax.set_title(f"Block {layer}: held-out positions, vocabulary-wide head", fontsize=9)
    save(fig, path)


def write_report(out, m: dict) -> None:
    lines = ["## Stage depth — depth-routing residual module and the revive operation\n",
             f"Backbone: {m['backbone']}. Positions: {m['positions']['train']} train, {m['positions']['heldout']} "
             f"held-out (same positions for every variant). Label rule (controller): {m['label_rule']}. "
             f"Identity at initialisation exact: {m['identity_exact']}.\n",
             "| block | variant | mean KL to full depth | top-1 agreement | acceptable |", "|---|---|---|---|---|"]
    for r in m["ablation"]:
        lines.append(f"| {r['layer']} | {r['variant']} | {r['kl']:.3f} | {r['top1']:.3f} | {r['acceptable']:.3f} |")
    lines.append("")
    for layer in m["layers"]:
        ablation_plot(m["ablation"], layer, out / f"ablation_L{layer}.png")
        lines.append(f"![block {layer}](depth/ablation_L{layer}.png)")  # relative to the run report
    rv = m["revive"]
    lines += ["", f"### Revive ({rv['unacceptable_positions']} held-out positions whose tuned-lens state at "
                  f"D={m['decision_layer']} is not acceptable)\n",
              "| revive at block | made acceptable | tuned lens alone there | shortlist token = full depth | "
              "MACs | remaining layers + head MACs | ratio |", "|---|---|---|---|---|---|---|"]
    for r in rv["rows"]:
        lines.append(f"| {r['layer']} | {_f(r['rescued_share'])} | {_f(r['plain_rescued_share'])} | "
                     f"{_f(r['emitted_top1_on_unacceptable'])} | {r['macs']:,} | {r['remaining_macs']:,} | "
                     f"{r['mac_ratio_vs_remaining']:.3f} |")
    lines += ["", f"Deployed revive block: {rv['chosen_layer']} ({rv['why']}).", ""]
    io.write_text(out / "report.md", "\n".join(lines))
