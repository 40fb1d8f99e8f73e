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

from agp import config, io
from agp.backbone import load, macs
from agp.backbone.lens import lens_stats, probe_positions
from agp.config import ConfigMixin
from agp.data.prompt_pack import PromptPackArgs, build_prompt_pack

NAME = "baseline"
MARKER = "stage0"
REQUIRES: list[str] = []
ALIASES = {"per_source": ["baseline-prompts"]}  # flag names kept from before the generated flags
HEADLINE = {"decode tok/s": "latency.decode_tok_per_s", "parity max |diff|": "parity.decode_max_abs_diff"}


@dataclass
class BaselineArgs(ConfigMixin):
    per_source: int = 10          # prompts per source (code, docs, chat) in the pack
    max_chars: int = 400          # characters kept of each prompt
    latency_prompts: int = 6      # prompts timed for prefill / decode latency
    decode_tokens: int = 16       # greedy decode steps per latency prompt
    exit_agree: float = 0.60      # split rule: top-1 agreement for an exit candidate
    exit_kl: float = 1.0          # split rule: mean KL (nats) for an exit candidate
    onset_agree: float = 0.15     # split rule: agreement at which the answer starts to form
    lens_positions: int = 24      # positions per prompt probed by the lens (the vocabulary-wide head is the cost)


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
    cfg = config.for_stage(BaselineArgs, NAME, args)
    out = run.stage_dir(NAME)
    backbone = load(getattr(args, "model", None))
    pack = build_prompt_pack(PromptPackArgs(per_source=cfg.per_source, max_chars=cfg.max_chars))
    io.write_jsonl(out / "prompts.jsonl", pack)
    encoded = [backbone.encode(r["text"]) for r in pack]
    lens = sufficiency(backbone, encoded, cfg)
    speed = measure_speed(backbone, encoded, cfg)
    write_artifacts(out, lens)
    metrics = stage_metrics(args, cfg, backbone, pack, out, lens, speed)
    from agp.report.baseline import write_report
    write_report(out, metrics)
    run.manifest.setdefault("fingerprints", {}).update(
        {"model": backbone.fingerprint, "tokenizer": backbone.tokenizer_fingerprint})
    run.manifest.setdefault("datasets", {})["baseline/prompts.jsonl"] = metrics["dataset"]["sha256"]
    return metrics


@dataclass
class Sufficiency:
    """Logit-lens statistics of every layer against full depth."""
    layers: list[int]
    per_position: dict         # kl / agree / margin -> [layers, positions]
    kl_mean: np.ndarray
    agree_mean: np.ndarray
    margin_mean: np.ndarray
    split_map: dict


def sufficiency(backbone, encoded: list[list[int]], cfg: BaselineArgs) -> Sufficiency:
    layers = list(range(1, backbone.n_layers + 1))
    acc = {k: [] for k in ("kl", "agree", "margin")}
    for ids in tqdm(encoded, desc="sufficiency (logit lens)", unit="prompt"):
        logits, hidden = backbone.capture(mx.array([ids]), layers)
        idx = mx.array(probe_positions(len(ids), cfg.lens_positions))
        stats = lens_stats(backbone, {layer: h[:, idx] for layer, h in hidden.items()}, logits[:, idx], layers)
        for k in acc:
            acc[k].append(stats[k])
    per_position = {k: np.concatenate(v, axis=1) for k, v in acc.items()}   # [L, positions]
    kl_mean, agree_mean = per_position["kl"].mean(1), per_position["agree"].mean(1)
    return Sufficiency(layers, per_position, kl_mean, agree_mean, per_position["margin"].mean(1),
                       split_layer_map(agree_mean, kl_mean, layers, backbone.n_layers, cfg))


@dataclass
class Speed:
    latency: dict
    parity: dict
    macs: dict
    matmul_gflops: float


def measure_speed(backbone, encoded: list[list[int]], cfg: BaselineArgs) -> Speed:
    """Latency and memory, segmented-vs-mlx-lm parity, MACs per token and the BLAS's GFLOP/s."""
    from agp._blas import measure_gflops
    from agp.backbone.latency import measure as measure_latency

    latency_prompts = encoded[: cfg.latency_prompts]
    with tqdm(total=len(latency_prompts), desc="latency", unit="prompt") as bar:
        latency = measure_latency(backbone, latency_prompts, cfg.decode_tokens, progress=bar)
    par = parity(backbone, encoded[0])
    cost = macs.summary(backbone, context=int(np.mean([len(e) for e in encoded])))
    return Speed(latency, par, cost, measure_gflops())


def write_artifacts(out, lens: Sufficiency) -> None:
    from agp.report.plots import sufficiency_plot

    with io.atomic_path(out / "sufficiency.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, layers=np.asarray(lens.layers), **lens.per_position)
    sufficiency_plot(lens.layers, lens.kl_mean, lens.agree_mean, lens.margin_mean, lens.split_map["candidates"],
                     out / "sufficiency.png")


def stage_metrics(args, cfg: BaselineArgs, backbone, pack, out, lens: Sufficiency, speed: Speed) -> dict:
    from agp import BLAS

    return {
        "config": cfg.to_dict(),
        "model": {"arg": getattr(args, "model", None), "path": str(backbone.path), "arch": backbone.arch,
                  "fingerprint": backbone.fingerprint, "tokenizer_fingerprint": backbone.tokenizer_fingerprint,
                  "n_layers": backbone.n_layers, "hidden_size": backbone.hidden_size,
                  "vocab_size": backbone.vocab_size},
        "dataset": {"prompts": len(pack), "positions": int(lens.per_position["kl"].shape[1]),
                    "sha256": io.sha256_file(out / "prompts.jsonl"),
                    "splits": {s: sum(r["split"] == s for r in pack) for s in ("train", "valid", "heldout")}},
        "latency": speed.latency, "parity": speed.parity, "macs_per_token": speed.macs,
        "blas": {**BLAS, "matmul_gflops": round(speed.matmul_gflops, 1)},
        "per_layer": {"layers": lens.layers, "kl_mean": lens.kl_mean.tolist(), "top1_agree": lens.agree_mean.tolist(),
                      "margin_mean": lens.margin_mean.tolist(),
                      "kl_p50": np.median(lens.per_position["kl"], 1).tolist()},
        "split_map": lens.split_map,
    }


CONFIG = BaselineArgs  # the dataclass `agp run` makes this stage's flags and --config section from
