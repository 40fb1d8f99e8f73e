"""Stage 0 — baseline: latency, memory, per-layer sufficiency, candidate split layers, MACs.

Outputs in <run>/baseline/: prompts.jsonl (the pack with splits), sufficiency.npz (per-layer,
per-position KL / top-1 agreement / margin), metrics in the manifest, report.md + PNG.
The split-layer rule is written in docs/baseline.md and implemented in `split_layer_map`.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from agp import argtypes, io
from agp.backbone import load, macs
from agp.backbone.lens import lens_stats
from agp.config import ConfigMixin
from agp.data.prompt_pack import PromptPackArgs, build_prompt_pack

NAME = "baseline"
MARKER = "stage0"
REQUIRES: list[str] = []


@dataclass
class BaselineArgs(ConfigMixin):
    per_source: int = 10          # prompts per source (code, docs, chat) in the pack
    max_chars: int = 400
    latency_prompts: int = 6
    decode_tokens: int = 16
    exit_agree: float = 0.60      # split rule: top-1 agreement for an exit candidate
    exit_kl: float = 1.0          # split rule: mean KL (nats) for an exit candidate
    onset_agree: float = 0.15     # split rule: agreement at which the answer starts to form
    lens_positions: int = 24      # positions per prompt probed by the lens (the 262144-wide head is the cost)


def add_arguments(p):
    d = BaselineArgs()
    p.add_argument("--baseline-prompts", type=argtypes.positive_int(), default=d.per_source, metavar="N",
                   help=f"prompts per source in the baseline pack (default {d.per_source}; 3 sources)")
    p.add_argument("--baseline-decode-tokens", type=argtypes.positive_int(), default=d.decode_tokens, metavar="N",
                   help=f"greedy decode steps per latency prompt (default {d.decode_tokens})")


def split_layer_map(agree: np.ndarray, kl: np.ndarray, layers: list[int], n_layers: int,
                    args: BaselineArgs) -> dict:
    """The documented rule (docs/baseline.md): exits = intermediate layers with mean top-1
    agreement >= exit_agree and mean KL <= exit_kl; onset = first layer with agreement >=
    onset_agree (where a remote 'continue' can start). Candidates = onset + exits, sorted."""
    exits = [int(l) for l, a, k in zip(layers, agree, kl) if l < n_layers and a >= args.exit_agree and k <= args.exit_kl]
    onset = next((int(l) for l, a in zip(layers, agree) if l < n_layers and a >= args.onset_agree), None)
    cands = sorted(set(exits + ([onset] if onset is not None else [])))
    return {"exit_layers": exits, "onset_layer": onset, "candidates": cands,
            "rule": {"exit_agree": args.exit_agree, "exit_kl": args.exit_kl, "onset_agree": args.onset_agree}}


def probe_positions(n_tokens: int, k: int) -> list[int]:
    """k evenly spaced positions (always the last), skipping BOS: a fixed, unbiased subsample
    keeps the per-layer head passes affordable (each costs vocab x hidden MACs per position)."""
    first = 1 if n_tokens > 1 else 0
    if n_tokens - first <= k:
        return list(range(first, n_tokens))
    return sorted({int(round(x)) for x in np.linspace(first, n_tokens - 1, k)})


def parity(bb, ids: list[int], steps: int = 4) -> dict:
    """Max |segmented - mlx-lm| logits difference for prefill and cached decode (fp32)."""
    tok = mx.array([ids])
    pre = mx.abs(bb.forward(tok) - bb.model(tok)).max().item()
    c1, c2 = bb.make_cache(), bb.make_cache()
    a, b = bb.model(tok, cache=c1), bb.forward(tok, cache=c2)
    worst = 0.0
    mid = bb.n_layers // 2
    for _ in range(steps):
        nxt = mx.argmax(a[:, -1], axis=-1).reshape(1, 1)
        a = bb.model(nxt, cache=c1)
        p = bb.start(nxt, c2)
        b = bb.head(p.run(p.run(p.h0, 0, mid), mid, bb.n_layers))
        worst = max(worst, mx.abs(a - b).max().item())
    return {"prefill_max_abs_diff": pre, "decode_max_abs_diff": worst, "decode_steps": steps}


def run(run, args) -> dict:
    """Measure the backbone and write the stage-0 artifacts."""
    from agp.report.plots import sufficiency_plot

    cfg = BaselineArgs(per_source=getattr(args, "baseline_prompts", BaselineArgs.per_source),
                       decode_tokens=getattr(args, "baseline_decode_tokens", BaselineArgs.decode_tokens))
    out = run.stage_dir(NAME)
    bb = load(getattr(args, "model", None))
    pack = build_prompt_pack(PromptPackArgs(per_source=cfg.per_source, max_chars=cfg.max_chars))
    io.write_jsonl(out / "prompts.jsonl", pack)
    encoded = [bb.encode(r["text"]) for r in pack]

    layers = list(range(1, bb.n_layers + 1))
    acc = {k: [] for k in ("kl", "agree", "margin")}
    for ids in tqdm(encoded, desc="sufficiency (logit lens)", unit="prompt"):
        logits, hidden = bb.capture(mx.array([ids]), layers)
        idx = mx.array(probe_positions(len(ids), cfg.lens_positions))
        s = lens_stats(bb, {l: h[:, idx] for l, h in hidden.items()}, logits[:, idx], layers)
        for k in acc:
            acc[k].append(s[k])
    per_pos = {k: np.concatenate(v, axis=1) for k, v in acc.items()}   # [L, positions]
    with io.atomic_path(out / "sufficiency.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, layers=np.asarray(layers), **per_pos)
    kl_mean = per_pos["kl"].mean(1)
    agree_mean = per_pos["agree"].mean(1)
    margin_mean = per_pos["margin"].mean(1)
    smap = split_layer_map(agree_mean, kl_mean, layers, bb.n_layers, cfg)

    lat_prompts = encoded[: cfg.latency_prompts]
    with tqdm(total=len(lat_prompts), desc="latency", unit="prompt") as bar:
        lat = __import__("agp.backbone.latency", fromlist=["measure"]).measure(
            bb, lat_prompts, cfg.decode_tokens, progress=bar)
    par = parity(bb, encoded[0])
    cost = macs.summary(bb, context=int(np.mean([len(e) for e in encoded])))

    sufficiency_plot(layers, kl_mean, agree_mean, margin_mean, smap["candidates"], out / "sufficiency.png")
    from agp import BLAS
    from agp._blas import measure_gflops
    gflops = measure_gflops()
    metrics = {
        "config": cfg.to_dict(),
        "model": {"arg": getattr(args, "model", None), "path": str(bb.path), "arch": bb.arch, "fingerprint": bb.fingerprint,
                  "tokenizer_fingerprint": bb.tokenizer_fingerprint, "n_layers": bb.n_layers,
                  "hidden_size": bb.hidden_size, "vocab_size": bb.vocab_size},
        "dataset": {"prompts": len(pack), "positions": int(per_pos["kl"].shape[1]),
                    "sha256": io.sha256_file(out / "prompts.jsonl"),
                    "splits": {s: sum(r["split"] == s for r in pack) for s in ("train", "valid", "heldout")}},
        "latency": lat, "parity": par, "macs_per_token": cost,
        "blas": {**BLAS, "matmul_gflops": round(gflops, 1)},
        "per_layer": {"layers": layers, "kl_mean": kl_mean.tolist(), "top1_agree": agree_mean.tolist(),
                      "margin_mean": margin_mean.tolist(),
                      "kl_p50": np.median(per_pos["kl"], 1).tolist()},
        "split_map": smap,
    }
    _report(out, metrics)
    run.manifest.setdefault("fingerprints", {}).update(
        {"model": bb.fingerprint, "tokenizer": bb.tokenizer_fingerprint})
    run.manifest.setdefault("datasets", {})["baseline/prompts.jsonl"] = metrics["dataset"]["sha256"]
    return metrics


def _report(out, m) -> None:
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
