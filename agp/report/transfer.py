"""Stage `transfer` report fragment: the rate-distortion table and plot per boundary, the decision."""
from __future__ import annotations

from agp import io


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def rate_distortion_plot(rows: list[dict], layer: int, goal: dict, path) -> None:
    """Resumed KL (log) and top-1 against bytes per token on the wire: one point per raw codec, and
    the learned transfer adapters as their own curves (one per objective)."""
    from agp.report.plots import plt, save
    at = sorted((r for r in rows if r["layer"] == layer and r["codec"] != "f32"), key=lambda r: r["bytes_per_token"])
    mine = [r for r in at if not r.get("adapter")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = [r["bytes_per_token"] for r in mine]
    ax.plot(x, [max(r["kl"], 1e-6) for r in mine], "o-", color="tab:red", label="resumed KL, raw codecs (nats)")
    for mode, style, colour in (("hidden", "D--", "tab:purple"), ("fisher", "v-.", "tab:orange"),
                                ("logit", "*-", "tab:purple")):
        ours = [r for r in at if (r.get("adapter") or {}).get("mode") == mode]
        if ours:
            ax.plot([r["bytes_per_token"] for r in ours], [max(r["kl"], 1e-6) for r in ours], style, color=colour,
                    ms=8 if mode == "logit" else 5, label=f"resumed KL, adapter ({mode})")
    for r in at:
        ax.annotate(r["codec"], (r["bytes_per_token"], max(r["kl"], 1e-6)), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(goal["kl"], color="tab:red", ls=":", lw=1)
    ax.axvline(goal["bytes_per_token"], color="grey", ls=":", lw=1, label=f"goal: {goal['bytes_per_token']} B")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per token on the wire (whole packet, amortised over the span)")
    ax.set_ylabel("KL(full depth || resumed)", color="tab:red")
    ax2 = ax.twinx()
    ax2.plot(x, [r["top1"] for r in mine], "s--", color="tab:blue", label="resumed top-1 (raw)")
    ours = [r for r in at if (r.get("adapter") or {}).get("mode") == "logit"]
    if ours:
        ax2.plot([r["bytes_per_token"] for r in ours], [r["top1"] for r in ours], "P:", color="tab:cyan",
                 label="resumed top-1 (adapter, logit)")
    ax2.plot(x, [r["continuation_agreement"] for r in mine], "^:", color="tab:green", label="continuation agreement")
    ax2.axhline(goal["top1"], color="tab:blue", ls=":", lw=1)
    ax2.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    ax2.legend(fontsize=7, loc="center right")
    ax.set_title(f"Boundary {layer}: held-out spans resumed through layers [{layer}, L)", fontsize=9)
    save(fig, path)


def write_report(out, m: dict) -> None:
    d = m["decision"]
    lines = ["## Stage transfer — boundary states on the wire, judged by the resumed model\n",
             f"Backbone: {m['backbone']}; prompts from the {m['lane']} lane; dataset positions {m['dataset']['positions']} "
             f"(states at boundaries {m['layers']}: onset {m['boundaries']['onset']}, D {m['boundaries']['decision']}, "
             f"late B {m['boundaries']['late']}). f32 transfer resumes to bitwise-identical logits and continuations: "
             f"{m['f32_resume_exact']}. Route classes among the oracle-labelled positions per split: "
             + "; ".join(f"{s} ({v['labelled']}): " + ", ".join(f"{k} {x:.2f}" for k, x in v.items() if k != "labelled")
                         for s, v in m["dataset"].get("route_shares", {}).items()) + ".\n",
             "| boundary | codec | bytes/state | all-in bytes/token | step packet B | cosine | KL | KL p95 | top-1 | "
             "continuation | identical continuations |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["rate_distortion"]:
        lines.append(f"| {r['layer']} | {r['codec']} | {r['bytes_per_token']:.1f} | {r['all_in_bytes_per_token']:.1f} | "
                     f"{r['step_packet_bytes']:.0f} | "
                     f"{r['cosine']:.5f} | {r['kl']:.4f} | {r['kl_p95']:.4f} | {r['top1']:.3f} | "
                     f"{r['continuation_agreement']:.3f} | {r['continuations_identical']}/{r['prompts']} |")
    lines.append("")
    for layer in m["layers"]:
        rate_distortion_plot(m["rate_distortion"], layer, d["goal"], out / f"rate_distortion_L{layer}.png")
        lines.append(f"![boundary {layer}](transfer/rate_distortion_L{layer}.png)")  # relative to the run report
    if m.get("long_span"):
        lines += ["", f"Past the 512-token window ({m['long_span'][0]['tokens']} tokens, logits after the last "
                      f"{m['long_span'][0]['scored_positions']} positions, at boundary {m['long_span'][0]['layer']}):", "",
                  "| codec | KL | top-1 | largest logit difference | continuation |", "|---|---|---|---|---|"]
        lines += [f"| {r['codec']} | {r['kl']:.2e} | {r['top1']:.3f} | {r['max_abs_logit_diff']:.3g} | "
                  f"{r['continuation_agreement']:.3f} |" for r in m["long_span"]]
    if m.get("equal_bytes"):
        lines += ["", "Learned transfer adapters against the raw codecs at equal bytes (the lowest-KL raw codec with at "
                      f"most {1 + d['equal_bytes_tolerance']:.2f}x the adapter's bytes; the smallest raw codec when all "
                      "are larger):", "",
                  "| boundary | adapter | bytes/state | KL | top-1 | raw codec | its bytes | its KL | its top-1 | adapter wins |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {v['layer']} | {v['adapter']} | {v['bytes_per_token']:.1f} | {v['kl']:.4f} | {v['top1']:.3f} | "
                  f"{v['raw']} | {v['raw_bytes_per_token']:.1f} | {v['raw_kl']:.4f} | {v['raw_top1']:.3f} | "
                  f"{'yes' if v['beats_raw'] else 'no'} |" for v in m["equal_bytes"]]
    e = m["end_to_end"]
    small = d.get("within_goal_bytes")
    lines += ["", f"**Decision** at boundary {d['layer']}: `{d['codec']}` ({d['why']}); meets the goal "
                  f"(top-1 >= {d['goal']['top1']}, KL <= {d['goal']['kl']}, <= {d['goal']['bytes_per_token']} B/token): "
                  f"{d['meets_goal']}. Adapters on the critical path (they beat the raw codecs at equal bytes): "
                  f"{', '.join(d.get('adapters_on_critical_path') or []) or 'none'}. Within "
                  f"{d['goal']['bytes_per_token']} B: "
                  + (f"`{small['codec']}` at {small['bytes_per_token']:.1f} B, KL {small['kl']:.3f}, top-1 {small['top1']:.3f}."
                     if small else "nothing fits."),
              f"End to end over a socket ({e['frames']} frames): KL {_f(e['kl'], '{:.4f}')}, top-1 {_f(e['top1'])}, "
              f"continuation {_f(e['continuation_agreement'])}; identical to the in-process resume: "
              f"{e['identical_to_in_process']}.", ""]
    io.write_text(out / "report.md", "\n".join(lines))
