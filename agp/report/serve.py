"""Stage `serve` report fragment: the layouts table, tok/s against the emulated round trip, reliability."""
from __future__ import annotations

from agp import io


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def rtt_plot(rows: list[dict], path) -> None:
    """tok/s of each two-host layout against the emulated round trip, single-host full as a line."""
    from agp.report.plots import plt, save
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for layout, style in (("naive split", "o-"), ("two-host speculative", "s-"), ("two-host routed", "^--")):
        mine = sorted((r for r in rows if r["layout"] == layout), key=lambda r: r["rtt_ms"])
        if mine:
            ax.plot([max(r["rtt_ms"], 0.01) for r in mine], [r["tok_s"] for r in mine], style, label=layout)
    for r in rows:
        if r["layout"] == "single host":
            ax.axhline(r["tok_s"], ls=":" if r["mode"] == "full" else "--", lw=1, color="grey")
            ax.annotate(f"one host, {r['mode']}", (0.01, r["tok_s"]), fontsize=7, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("emulated round trip (ms; 0 plotted at 0.01)")
    ax.set_ylabel("decode tok/s")
    ax.legend(fontsize=7)
    ax.set_title("Where the split stops paying: tok/s against link round trip", fontsize=9)
    save(fig, path)


def layout_lines(m: dict) -> list[str]:
    lines = ["| layout | mode | emulated RTT ms | tok/s | × one-host full | round trips / token | bytes up / token | "
             "RTT p50 / p99 ms | server infer p50 ms | = full | = one-host mode | agreement with full |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["layouts"]["rows"]:
        link = r.get("link") or {}
        lines.append(f"| {r['layout']} | {r['mode']} | {_f(r['rtt_ms'], '{:g}')} | {_f(r['tok_s'], '{:.1f}')} | "
                     f"{_f(r['speed_vs_full'])} | {_f(link.get('round_trips_per_token'))} | "
                     f"{_f(link.get('bytes_up_per_token'), '{:.0f}')} | "
                     f"{_f(link.get('rtt_ms_p50'))} / {_f(link.get('rtt_ms_p99'))} | "
                     f"{_f((link.get('server_ms_p50') or {}).get('infer'))} | {r['equal_full']} | "
                     f"{r.get('equal_single_host', '-')} | {_f(r.get('agreement_full', 1.0 if r['equal_full'] else None), '{:.3f}')} |")
    ring = m.get("ring")
    if ring:
        lines.append(f"| naive split, mx.distributed ring | full | loopback | {_f(ring.get('tok_s'), '{:.1f}')} | "
                     f"{_f(ring['tok_s'] / ring['single_host_tok_s'] if ring.get('tok_s') and ring.get('single_host_tok_s') else None)} | "
                     f"1.00 | {_f(ring.get('bytes_up_per_token'), '{:.0f}')} | "
                     f"{_f(ring.get('rtt_ms_p50'))} / {_f(ring.get('rtt_ms_p99'))} | - | {ring['equal_full']} | - | - |")
    return lines


def reliability_lines(rel: dict) -> list[str]:
    c, r, s, p = rel["concurrency"], rel["restart"], rel["sessions"], rel["ping"]
    bad = "; ".join(f"{k}: {v['reason']}{'' if v['closed'] else ' (left open)'}"
                    f"{'' if v['others_served'] else ' (others NOT served)'}" for k, v in rel["bad_frames"].items())
    return [f"- Empty round trip on loopback (PING, {p['n']}): p50 {p['p50_ms']:.3f} ms, p99 {p['p99_ms']:.3f} ms.",
            f"- {c['clients']} concurrent clients × {c['requests_each']} requests: {c['answered']} answered, {c['lost']} "
            f"lost, {c.get('unsent', 0)} unsent within the {c.get('timeout_s', 0):.0f} s bound, {c['duplicated']} "
            f"duplicated, {c['misrouted']} misrouted, {c['wrong_tokens']} wrong tokens, {c['errors']} client errors "
            f"({c['requests_per_s']:.0f} requests/s).",
            f"- Server restarted after a few tokens: output equals full depth: {r['equal_full']} "
            f"({r['reconnects']} reconnects, {r['resyncs']} re-sends of the session, {r['fallbacks']} local fallbacks).",
            f"- Bad frames (each on its own connection, typed reason): {bad}.",
            f"- {s['sessions']} short sessions: {s['held_after']} held after; RSS {s['rss_before_mb']:.0f} → "
            f"{s['rss_after_mb']:.0f} MB ({s['rss_growth_mb']:+.1f} MB)."]


def write_report(out, m: dict) -> None:
    h = m["headline"]
    lines = ["## Stage serve — two hosts: the resume server against one host and the naive split\n",
             f"Split at block {m['split']} (draft: {m['draft']['kind']} head at layer {m['draft']['layer']}); "
             f"prompts of {m['prompt_tokens']} tokens, {m['layouts']['new_tokens']} new tokens each; boundary states "
             f"cross as `{m['layouts']['codec']}`. Two-host lossless output equals full depth on every prompt: "
             f"**{h['lossless_equal']}**. At {h['max_rtt_ms']:g} ms, two-host speculative runs "
             f"{_f(h['speculative_vs_naive_at_max_rtt'])}× the naive split's tok/s.\n"]
    lines += layout_lines(m)
    rtt_plot(m["layouts"]["rows"], out / "tok_s_vs_rtt.png")
    lines += ["", "![tok/s against round trip](serve/tok_s_vs_rtt.png)", "", "Reliability:", ""]
    lines += reliability_lines(m["reliability"]) + [""]
    io.write_text(out / "report.md", "\n".join(lines))
