"""Stage-1 report fragment: the adapter's training and base-vs-tuned evaluation."""
from __future__ import annotations

from agp import io
from agp.report.plots import adapter_plots


def write_report(out, m) -> None:
    """Write <run>/adapter/report.md from the stage metrics."""
    ev, tr, a = m["eval"], m["train"], m["adapter"]
    lens_png = adapter_plots(m, out)
    rules = "\n".join(f"| {k} | {v['dropped']} | {v['changed']} |" for k, v in m["data"]["rules"].items())
    lanes = "\n".join(f"| {lane} | " + " | ".join(str(s[x]["rows"]) for x in ("train", "valid", "heldout")) + " |"
                      for lane, s in m["data"]["lanes"].items())
    rows = "\n".join(f"| {name} | {e['base_nll']:.3f} | {e['tuned_nll']:.3f} | {e['delta_nll']:+.3f} | "
                     f"{e['base_ppl']:.1f} → {e['tuned_ppl']:.1f} | {e['tokens']} |" for name, e in ev.items())
    text = f"""## Stage 1 — domain adapter

{a['kind'].upper()} rank {a['rank']} on blocks {a['blocks']} ({a['trainable_params']:,} trainable parameters), {tr['steps']} steps
of batch {m['config']['batch_size']} × ≤{m['config']['max_seq']} tokens through mlx-lm's tuner (resumed from step {tr['resumed_from']}).
Step time (median) {tr['step_seconds_median']:.2f} s, {tr['tokens_per_second_median']:.0f} tok/s; MLX peak memory {tr['mlx_peak_memory_gb']:.2f} GiB,
RSS peak {tr['rss_peak_mb']:.0f} MB; training loss {tr['loss_first']:.3f} → {tr['loss_last']:.3f}; stage {m['seconds']:.0f} s.
Data: {m['data']['source']} — {m['data']['read']['records']} records read, {m['data']['read']['malformed']} malformed lines, {m['data']['kept']} kept.

| eval set | base NLL | tuned NLL | Δ | perplexity | tokens |
|---|---|---|---|---|---|
{rows}

![loss and per-layer sufficiency before/after](adapter/{lens_png})

| filter rule | dropped | changed |
|---|---|---|
{rules}

| lane | train | valid | heldout |
|---|---|---|---|
{lanes}
"""
    io.write_text(out / "report.md", text)
