"""Stage 1 — domain adapter: LoRA/DoRA on the last blocks, trained with mlx-lm's tuner on the SFT lane.

Outputs in <run>/adapter/:
  data/                  the four lanes + dataset manifest (agp.data.build layout)
  adapter/               mlx-lm adapter dir (adapter_config.json with an "agp" metadata section,
                         adapters.safetensors); load with agp.backbone.load(model, adapter=dir)
  checkpoints/           atomic checkpoints; an interrupted stage resumes from the last one
  eval.json              base vs tuned NLL on held-out SFT rows and the control text, lens stats
  report.md + PNGs       tuned-vs-untuned report
The default config is sized to finish in a few minutes on 2 CPU cores; `--adapter-iters`
(and the other --adapter-* flags) make a longer run. See docs/adapter.md.
"""
from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from agp import argtypes, io
from agp.config import ConfigMixin
from agp.data.build import DataArgs, build, load_lane
from agp.data.default_corpus import CONTROL, control_texts
from agp.errors import AGPError
from agp.train import nll, tuner

NAME = "adapter"
MARKER = "stage1"
REQUIRES = ["baseline"]


@dataclass
class AdapterArgs(ConfigMixin):
    kind: str = "lora"            # lora | dora
    rank: int = 8
    scale: float = 20.0           # mlx-lm's LoRA scale (alpha / rank)
    dropout: float = 0.0
    blocks: int = 4               # adapters on the last N transformer blocks
    iters: int = 16               # optimizer steps (CI-sized; see docs/adapter.md for a real run)
    batch_size: int = 2
    max_seq: int = 64             # tokens per sequence (longer rows are cut; bounds the [B, T, 262144] logits)
    learning_rate: float = 1e-4
    warmup: int = 2
    seed: int = 0
    checkpoint_every: int = 8     # steps between checkpoints
    eval_rows: int = 6            # held-out SFT rows scored (sorted by id, the first N)
    control_rows: int = 4         # control paragraphs scored
    lens_positions: int = 4       # positions per held-out row read through the logit lens
    lens_rows: int = 3            # held-out rows that get the lens pass (a 262144-wide head per layer)
    source: str | None = None     # transcripts directory; None = offline default corpus
    source_format: str | None = None


def add_arguments(p):
    d = AdapterArgs()
    p.add_argument("--source", metavar="DIR", default=None,
                   help="directory of transcripts (*.jsonl: Claude Code sessions, prompt logs, Codex history, "
                        "prompt/response or chat messages) for the data lanes; default: the offline corpus "
                        "(stdlib code, pydoc topics, fixture chat pairs)")
    p.add_argument("--source-format", default=None, choices=["claude_session", "prompt_log", "codex_history",
                                                              "pairs", "chat"],
                   help="read every source file with this reader instead of detecting the format per file")
    p.add_argument("--adapter-kind", choices=["lora", "dora"], default=d.kind, help=f"adapter type (default {d.kind})")
    p.add_argument("--adapter-rank", type=argtypes.positive_int(), default=d.rank, metavar="R", help=f"adapter rank (default {d.rank})")
    p.add_argument("--adapter-scale", type=argtypes.float_range(), default=d.scale, help=f"LoRA scale (default {d.scale})")
    p.add_argument("--adapter-blocks", type=argtypes.positive_int(), default=d.blocks, metavar="N",
                   help=f"adapt the last N transformer blocks (default {d.blocks})")
    p.add_argument("--adapter-iters", type=argtypes.positive_int(), default=d.iters, metavar="N",
                   help=f"training steps (default {d.iters}: sized for CI on 2 CPU cores; use 200+ for a real run)")
    p.add_argument("--adapter-batch", type=argtypes.positive_int(), default=d.batch_size, metavar="B",
                   help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--adapter-max-seq", type=argtypes.positive_int(), default=d.max_seq, metavar="T",
                   help=f"tokens per sequence (default {d.max_seq}); memory grows with B x T x vocab")
    p.add_argument("--adapter-lr", type=argtypes.float_range(0, lo_open=True), default=d.learning_rate, help=f"peak learning rate (default {d.learning_rate})")
    p.add_argument("--adapter-eval-rows", type=argtypes.positive_int(), default=d.eval_rows, metavar="N",
                   help=f"held-out rows scored before/after (default {d.eval_rows})")
    p.add_argument("--adapter-control-rows", type=argtypes.int_range(1, 16), default=d.control_rows, metavar="N",
                   help=f"control paragraphs scored before/after (default {d.control_rows}, at most 16)")
    p.add_argument("--adapter-checkpoint-every", type=argtypes.non_negative_int(), default=d.checkpoint_every, metavar="N",
                   help=f"steps between checkpoints, 0 = none (default {d.checkpoint_every})")


def config_from(args) -> AdapterArgs:
    d = AdapterArgs()
    g = lambda name, default: getattr(args, name, default)  # noqa: E731
    cfg = AdapterArgs(kind=g("adapter_kind", d.kind), rank=g("adapter_rank", d.rank), scale=g("adapter_scale", d.scale),
                      blocks=g("adapter_blocks", d.blocks), iters=g("adapter_iters", d.iters),
                      batch_size=g("adapter_batch", d.batch_size), max_seq=g("adapter_max_seq", d.max_seq),
                      learning_rate=g("adapter_lr", d.learning_rate), eval_rows=g("adapter_eval_rows", d.eval_rows),
                      checkpoint_every=g("adapter_checkpoint_every", d.checkpoint_every),
                      control_rows=g("adapter_control_rows", d.control_rows),
                      source=g("source", None), source_format=g("source_format", None))
    for name in ("rank", "blocks", "iters", "batch_size", "max_seq", "eval_rows", "control_rows"):
        if getattr(cfg, name) < 1:
            raise AGPError(f"--adapter-{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    return cfg


def eval_rows(data_dir, cfg: AdapterArgs) -> list[dict]:
    """The held-out SFT rows the stage (and the gate) score: the first eval_rows by id."""
    rows = sorted(load_lane(data_dir, "sft", "heldout"), key=lambda r: r["id"])
    return rows[: cfg.eval_rows]


def control_rows(cfg: AdapterArgs) -> list[dict]:
    return [{"text": t} for t in control_texts()[: cfg.control_rows]]


def _fresh_backbone(model):
    """A backbone of our own: adapters are attached in place, so never reuse the cached one."""
    from agp.backbone.backbone import load
    return load.__wrapped__(model)


def run(run, args) -> dict:
    """Build the lanes, train the adapter, evaluate base vs tuned, write artifacts and report."""
    t0 = time.perf_counter()
    cfg = config_from(args)
    out = run.stage_dir(NAME)
    data_dir = out / "data"
    man = build(DataArgs(source=cfg.source, format=cfg.source_format), data_dir)
    train_rows = load_lane(data_dir, "sft", "train")
    held = eval_rows(data_dir, cfg)
    if not held:
        raise AGPError(f"the SFT lane of {cfg.source or 'the default corpus'} has no held-out rows to evaluate on; "
                       f"bring more prompt/response exchanges (held-out is 10% by content hash)")

    bb = _fresh_backbone(getattr(args, "model", None))
    base_fp = bb.fingerprint
    train_set = nll.encode_rows(bb, train_rows, cfg.max_seq)
    if len(train_set) < cfg.batch_size:
        raise AGPError(f"the SFT lane has {len(train_set)} usable training rows, fewer than --adapter-batch "
                       f"{cfg.batch_size}; bring more exchanges or lower --adapter-batch")
    held_set = nll.encode_rows(bb, held, cfg.max_seq)
    ctrl_set = nll.encode_rows(bb, control_rows(cfg), cfg.max_seq)
    sft_sha = man["lanes"]["sft"]["train"]["sha256"]
    ident = hashlib.sha256(json.dumps([cfg.to_dict(), sft_sha, base_fp], sort_keys=True).encode()).hexdigest()
    ckpt = tuner.Checkpoints(out / "checkpoints", ident)
    ckpt.root.mkdir(parents=True, exist_ok=True)

    # base evaluation (cached beside the checkpoints so a resumed stage does not redo it)
    base_path = ckpt.root / "base_eval.json"
    base = json.loads(base_path.read_text()) if base_path.exists() else {}
    if base.get("ident") != ident:
        base = {"ident": ident, "heldout": nll.evaluate(bb, held_set, cfg.lens_positions, "base held-out", cfg.lens_rows),
                "control": nll.evaluate(bb, ctrl_set, 0, "base control")}
        io.write_json(base_path, base)

    mx.random.seed(cfg.seed)   # LoRA's A matrices are initialised from the global MLX generator
    adapter_cfg = tuner.attach(bb.model, cfg.kind, cfg.blocks, cfg.rank, cfg.scale, cfg.dropout)
    n_train = tuner.trainable_count(bb.model)
    mx.reset_peak_memory()
    t_train = time.perf_counter()
    fit = tuner.fit(bb.model, train_set, iters=cfg.iters, batch_size=cfg.batch_size, max_seq=cfg.max_seq,
                    learning_rate=cfg.learning_rate, warmup=cfg.warmup, seed=cfg.seed, ckpt=ckpt,
                    every=cfg.checkpoint_every)
    train_seconds = time.perf_counter() - t_train
    peak_gb = mx.get_peak_memory() / 2**30
    tuned = {"heldout": nll.evaluate(bb, held_set, cfg.lens_positions, "tuned held-out", cfg.lens_rows),
             "control": nll.evaluate(bb, ctrl_set, 0, "tuned control")}

    blocks = list(range(bb.n_layers - min(cfg.blocks, bb.n_layers), bb.n_layers))
    meta = {"base_fingerprint": base_fp, "tokenizer_fingerprint": bb.tokenizer_fingerprint,
            "base_model": str(bb.path), "kind": cfg.kind, "rank": cfg.rank, "scale": cfg.scale,
            "blocks": blocks, "data_sha256": sft_sha, "steps": cfg.iters, "trainable_params": n_train,
            "config": cfg.to_dict()}
    adapter_dir = out / "adapter"
    tuner.save_adapter(adapter_dir, bb.model, adapter_cfg, meta)

    hist = fit["history"]
    steps_timed = [h["step_seconds"] for h in hist[1:]] or [h["step_seconds"] for h in hist]
    ev = {}
    for split in ("heldout", "control"):
        b, t = base[split], tuned[split]
        ev[split] = {"base_nll": b["nll"], "tuned_nll": t["nll"], "base_ppl": b["ppl"], "tuned_ppl": t["ppl"],
                     "tokens": t["tokens"], "sequences": t["sequences"], "delta_nll": t["nll"] - b["nll"]}
    metrics = {
        "config": cfg.to_dict(),
        "data": {"manifest_sha256": io.sha256_file(data_dir / "manifest.json"), "rules": man["rules"],
                 "read": {k: man["read"][k] for k in ("records", "malformed")}, "kept": man["kept"],
                 "lanes": man["lanes"], "source": man["source"]},
        "adapter": {**{k: meta[k] for k in ("kind", "rank", "scale", "blocks", "steps", "trainable_params",
                                            "data_sha256", "base_fingerprint")},
                    "weights_sha256": io.sha256_file(adapter_dir / "adapters.safetensors")},
        "eval": ev,
        "eval_set": {"heldout_ids": [r["id"] for r in held], "control_rows": cfg.control_rows,
                     "max_seq": cfg.max_seq, "lens_positions": cfg.lens_positions,
                     "lens_rows": cfg.lens_rows},
        "lens": {"base": base["heldout"].get("lens"), "tuned": tuned["heldout"].get("lens")},
        "train": {"steps": cfg.iters, "resumed_from": fit["resumed_from"], "seconds": round(train_seconds, 2),
                  "step_seconds_median": float(np.median(steps_timed)) if steps_timed else None,
                  "tokens_per_second_median": float(np.median([h["tokens_per_second"] for h in hist])) if hist else None,
                  "loss_first": hist[0]["loss"] if hist else None, "loss_last": hist[-1]["loss"] if hist else None,
                  "mlx_peak_memory_gb": round(peak_gb, 3),
                  "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "history": hist},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    io.write_json(out / "eval.json", {"base": base, "tuned": tuned})
    _report(out, metrics)
    run.manifest.setdefault("datasets", {}).update(
        {f"adapter/data/{lane}/{s}.jsonl": v["sha256"] for lane, splits in man["lanes"].items() for s, v in splits.items()})
    run.manifest["datasets"]["adapter/data/manifest.json"] = metrics["data"]["manifest_sha256"]
    run.update_stage(NAME, artifacts={"adapter_dir": str(adapter_dir), "data_dir": str(data_dir),
                                      "eval": str(out / "eval.json")})
    return metrics


def _report(out, m) -> None:
    from agp.report.plots import adapter_plots

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
