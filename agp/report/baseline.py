"""Stage-0 report fragment: latency, parity, MACs and per-layer sufficiency."""
from __future__ import annotations

from agp import io


def write_report(out, m) -> None:
    """Write <run>/baseline/report.md from the stage metrics."""
    lat, pl = m["latency"], m["per_layer"]
    rows = "\n".join(f"| {l} | {k:.3f} | {a:.3f} | {g:.3f} |" for l, k, a, g in
                     zip(pl["layers"], pl["kl_mean"], pl["top1_agree"], pl["margin_mean"]))
    c = m["macs_per_token"]
    text = f"""## Stage 0 — baseline

Model `{m['model']['arch']}` ({m['model']['n_layers']} layers, hidden {m['model']['hidden_size']}, fingerprint `{m['model']['fingerprint'][:16]}`), BLAS: {m['blas']['blas']} ({m['blas']['matmul_gflops']} GFLOP/s fp32 matmul).
Prompt pack: {m['dataset']['prompts']} prompts, {m['dataset']['positions']} positions (sha256 `{m['dataset']['sha256'][:16]}`).

| latency | p50 | p95 |
|---|---|---|
| prefill (s) | {lat['prefill_s']['p50']:.4f} | {lat['prefill_s']['p95']:.4f} |
| decode per token (s) | {lat['decode_s']['p50']:.4f} | {lat['decode_s']['p95']:.4f} |

Decode {lat['decode_tok_per_s']:.1f} tok/s, prefill {lat['prefill_tok_per_s']:.1f} tok/s; MLX peak {lat['mlx_peak_memory_mb']:.0f} MB, RSS peak {lat['rss_peak_mb']:.0f} MB.
Parity with mlx-lm: prefill {m['parity']['prefill_max_abs_diff']:.2e}, decode {m['parity']['decode_max_abs_diff']:.2e}.
MACs per token: layers {sum(c['layers'])/1e6:.1f} M ({c['layers_share']:.0%}), head {c['head']/1e6:.1f} M ({c['head_share']:.0%}).

Candidate split layers: **{m['split_map']['candidates']}** (exits {m['split_map']['exit_layers']}, onset {m['split_map']['onset_layer']}; rule in docs/baseline.md).

![per-layer sufficiency](baseline/sufficiency.png)

| layer | mean KL(final‖lens) | top-1 agreement | margin |
|---|---|---|---|
{rows}
"""
    io.write_text(out / "report.md", text)
