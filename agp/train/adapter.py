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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from agp import config, io
from agp.config import ConfigMixin
from agp.data.build import DataArgs, build, load_lane
from agp.data.default_corpus import CONTROL, control_texts
from agp.errors import AGPError
from agp.train import distributed, nll, tuner

NAME = "adapter"
MARKER = "stage1"
REQUIRES = ["baseline"]
ALIASES = {"source": ["source"], "source_format": ["source-format"], "batch_size": ["adapter-batch"],
           "learning_rate": ["adapter-lr"]}  # flag names kept from before the generated flags
SOURCE_FORMATS = ("claude_session", "prompt_log", "codex_history", "pairs", "chat")
HEADLINE = {"held-out dNLL": "eval.heldout.delta_nll", "control dNLL": "eval.control.delta_nll"}


@dataclass
class AdapterArgs(ConfigMixin):
    kind: str = "lora"            # lora | dora
    rank: int = 8
    scale: float = 20.0           # mlx-lm's LoRA scale (alpha / rank)
    dropout: float = 0.0          # dropout inside the adapter
    blocks: int = 4               # adapters on the last N transformer blocks
    iters: int = 16               # optimizer steps (CI-sized; see docs/adapter.md for a real run)
    batch_size: int = 2           # sequences per step
    max_seq: int = 64             # tokens per sequence (longer rows are cut; bounds the [B, T, vocab] logits)
    learning_rate: float = 1e-4   # peak learning rate (cosine schedule)
    warmup: int = 2               # warm-up steps
    seed: int = 0                 # seeds batches and initialisation
    checkpoint_every: int = 8     # steps between checkpoints
    eval_rows: int = 6            # held-out SFT rows scored (sorted by id, the first N)
    control_rows: int = 4         # control paragraphs scored
    lens_positions: int = 4       # positions per held-out row read through the logit lens
    lens_rows: int = 3            # held-out rows that get the lens pass (a vocabulary-wide head per layer)
    source: str | None = None     # transcripts directory; None = offline default corpus
    source_format: str | None = None  # read every source file with this reader instead of detecting it
    peer_timeout: float = 300.0   # under mlx.launch: seconds a rank waits on its peers before it ends with one line

    def validate(self) -> None:
        for name in ("rank", "blocks", "iters", "batch_size", "max_seq", "eval_rows", "control_rows"):
            if getattr(self, name) < 1:
                raise AGPError(f"--adapter-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.peer_timeout <= 0:
            raise AGPError(f"--adapter-peer-timeout must be positive seconds, got {self.peer_timeout}")
        if self.kind not in ("lora", "dora"):
            raise AGPError(f"--adapter-kind must be lora or dora, got {self.kind!r}")
        if self.source_format not in (None, *SOURCE_FORMATS):
            raise AGPError(f"--adapter-source-format must be one of {', '.join(SOURCE_FORMATS)}, got {self.source_format!r}")


def config_from(args) -> AdapterArgs:
    return config.for_stage(AdapterArgs, NAME, args)


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
    world = distributed.world()
    out = run.stage_dir(NAME)
    lanes, backbone, sets, ckpt = prepare(out, cfg, getattr(args, "model", None), world)
    # across ranks the base is scored after training, so no peer waits on rank 0's evaluation
    base = base_eval(backbone, sets, ckpt, cfg) if world.size == 1 else None
    training = train_adapter(backbone, sets, ckpt, cfg, world)
    base = base or base_eval(_fresh_backbone(getattr(args, "model", None)), sets, ckpt, cfg)
    tuned = {"heldout": nll.evaluate(backbone, sets.heldout, cfg.lens_positions, "tuned held-out", cfg.lens_rows),
             "control": nll.evaluate(backbone, sets.control, 0, "tuned control")}
    adapter_dir, meta = save_adapter(out / "adapter", backbone, training, lanes, cfg)
    metrics = stage_metrics(cfg, lanes, adapter_dir, meta, base, tuned, training)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    io.write_json(out / "eval.json", {"base": base, "tuned": tuned})
    from agp.report.adapter import write_report
    write_report(out, metrics)
    run.manifest.setdefault("datasets", {}).update(
        {f"adapter/data/{lane}/{s}.jsonl": v["sha256"] for lane, splits in lanes.manifest["lanes"].items()
         for s, v in splits.items()})
    run.manifest["datasets"]["adapter/data/manifest.json"] = metrics["data"]["manifest_sha256"]
    run.update_stage(NAME, artifacts={"adapter_dir": run.relative(adapter_dir), "data_dir": run.relative(lanes.data_dir),
                                      "eval": run.relative(out / "eval.json")})
    return metrics


def worker(args) -> int:
    """A rank other than 0 under `mlx.launch`: the same lanes, model and training as rank 0, in a
    scratch folder of its own (the run lives on rank 0's host); it writes nothing that stays."""
    cfg = config_from(args)
    world = distributed.world()
    with tempfile.TemporaryDirectory(prefix="agp-rank-") as scratch:
        _, backbone, sets, ckpt = prepare(Path(scratch), cfg, getattr(args, "model", None), world)
        training = train_adapter(backbone, sets, ckpt, cfg, world)
    mine = training.fit["ranks"][world.rank]
    print(f"agp: {world.label}: trained steps {training.fit['resumed_from'] + 1}-{cfg.iters} "
          f"({mine['tokens_per_second']} tok/s on this rank); rank 0 writes the adapter and the run")
    return 0


def prepare(out: Path, cfg: AdapterArgs, model, world):
    """Lanes, a fresh backbone, encoded sets and the checkpoints (rank 0's only write), with every
    rank checked to hold the same settings, data and model before any training."""
    lanes = build_lanes(out / "data", cfg)
    backbone = _fresh_backbone(model)
    sets = encode_sets(backbone, lanes, cfg)
    ident = _identity(cfg, lanes, backbone.fingerprint)
    with distributed.PeerWatch(world, cfg.peer_timeout) as watch:
        watch.kick("joining (every rank checks it holds the same settings, data and model)")
        try:
            distributed.agree(world, {"identity": ident, "train_rows": len(sets.train)})
        except RuntimeError as e:
            raise distributed.lost(world, watch.phase, e) from None
    ckpt = tuner.Checkpoints(out / "checkpoints", ident, writer=world.writer)
    if world.writer:
        ckpt.root.mkdir(parents=True, exist_ok=True)
    return lanes, backbone, sets, ckpt


@dataclass
class Lanes:
    data_dir: Path
    manifest: dict             # the data build's manifest
    train_rows: list[dict]     # SFT lane, train split
    heldout_rows: list[dict]   # the scored held-out SFT rows (eval_rows)


def build_lanes(data_dir: Path, cfg: AdapterArgs) -> Lanes:
    manifest = build(DataArgs(source=cfg.source, format=cfg.source_format), data_dir)
    heldout = eval_rows(data_dir, cfg)
    if not heldout:
        raise AGPError(f"the SFT lane of {cfg.source or 'the default corpus'} has no held-out rows to evaluate on; "
                       f"bring more prompt/response exchanges (held-out is 10% by content hash)")
    return Lanes(data_dir, manifest, load_lane(data_dir, "sft", "train"), heldout)


@dataclass
class EncodedSets:
    train: list
    heldout: list
    control: list


def encode_sets(backbone, lanes: Lanes, cfg: AdapterArgs) -> EncodedSets:
    train_set = nll.encode_rows(backbone, lanes.train_rows, cfg.max_seq)
    if len(train_set) < cfg.batch_size:
        raise AGPError(f"the SFT lane has {len(train_set)} usable training rows, fewer than --adapter-batch "
                       f"{cfg.batch_size}; bring more exchanges or lower --adapter-batch")
    return EncodedSets(train_set, nll.encode_rows(backbone, lanes.heldout_rows, cfg.max_seq),
                       nll.encode_rows(backbone, control_rows(cfg), cfg.max_seq))


def _identity(cfg: AdapterArgs, lanes: Lanes, base_fingerprint: str) -> str:
    """What a checkpoint must match to be resumed: the config, the training data and the base model."""
    sft_sha = lanes.manifest["lanes"]["sft"]["train"]["sha256"]
    settings = {k: v for k, v in cfg.to_dict().items() if k != "peer_timeout"}   # a wait bound, not a result
    return hashlib.sha256(json.dumps([settings, sft_sha, base_fingerprint], sort_keys=True).encode()).hexdigest()


def base_eval(backbone, sets: EncodedSets, ckpt, cfg: AdapterArgs) -> dict:
    """Base-model NLL, cached beside the checkpoints so a resumed stage does not redo it."""
    path = ckpt.root / "base_eval.json"
    base = json.loads(path.read_text()) if path.exists() else {}
    if base.get("ident") != ckpt.fingerprint:
        base = {"ident": ckpt.fingerprint,
                "heldout": nll.evaluate(backbone, sets.heldout, cfg.lens_positions, "base held-out", cfg.lens_rows),
                "control": nll.evaluate(backbone, sets.control, 0, "base control")}
        io.write_json(path, base)
    return base


@dataclass
class Training:
    base_fingerprint: str      # of the backbone before the adapter was attached
    adapter_config: dict
    trainable_params: int
    fit: dict                  # tuner.fit's result: history, resumed_from, ranks
    world: dict                # world_size, backend
    seconds: float
    peak_gb: float


def train_adapter(backbone, sets: EncodedSets, ckpt, cfg: AdapterArgs, world=tuner.SINGLE) -> Training:
    base_fingerprint = backbone.fingerprint
    mx.random.seed(cfg.seed)   # LoRA's A matrices are initialised from the global MLX generator
    adapter_config = tuner.attach(backbone.model, cfg.kind, cfg.blocks, cfg.rank, cfg.scale, cfg.dropout)
    trainable = tuner.trainable_count(backbone.model)
    mx.reset_peak_memory()
    start = time.perf_counter()
    fit = tuner.fit(backbone.model, sets.train, iters=cfg.iters, batch_size=cfg.batch_size, max_seq=cfg.max_seq,
                    learning_rate=cfg.learning_rate, warmup=cfg.warmup, seed=cfg.seed, ckpt=ckpt,
                    every=cfg.checkpoint_every, world=world, peer_timeout=cfg.peer_timeout)
    return Training(base_fingerprint, adapter_config, trainable, fit, world.to_dict(), time.perf_counter() - start,
                    mx.get_peak_memory() / 2**30)


def save_adapter(adapter_dir: Path, backbone, training: Training, lanes: Lanes, cfg: AdapterArgs):
    """The mlx-lm adapter directory with AGP's metadata; returns it and the metadata."""
    n = backbone.n_layers
    meta = {"base_fingerprint": training.base_fingerprint, "tokenizer_fingerprint": backbone.tokenizer_fingerprint,
            "base_model": str(backbone.path), "kind": cfg.kind, "rank": cfg.rank, "scale": cfg.scale,
            "blocks": list(range(n - min(cfg.blocks, n), n)),
            "data_sha256": lanes.manifest["lanes"]["sft"]["train"]["sha256"], "steps": cfg.iters,
            "trainable_params": training.trainable_params, "config": cfg.to_dict()}
    tuner.save_adapter(adapter_dir, backbone.model, training.adapter_config, meta)
    return adapter_dir, meta


def stage_metrics(cfg: AdapterArgs, lanes: Lanes, adapter_dir: Path, meta: dict, base: dict, tuned: dict,
                  training: Training) -> dict:
    manifest = lanes.manifest
    evaluation = {}
    for split in ("heldout", "control"):
        b, t = base[split], tuned[split]
        evaluation[split] = {"base_nll": b["nll"], "tuned_nll": t["nll"], "base_ppl": b["ppl"],
                             "tuned_ppl": t["ppl"], "tokens": t["tokens"], "sequences": t["sequences"],
                             "delta_nll": t["nll"] - b["nll"]}
    return {
        "config": cfg.to_dict(),
        "data": {"manifest_sha256": io.sha256_file(lanes.data_dir / "manifest.json"), "rules": manifest["rules"],
                 "read": {k: manifest["read"][k] for k in ("records", "malformed")}, "kept": manifest["kept"],
                 "lanes": manifest["lanes"], "source": manifest["source"]},
        "adapter": {**{k: meta[k] for k in ("kind", "rank", "scale", "blocks", "steps", "trainable_params",
                                            "data_sha256", "base_fingerprint")},
                    "weights_sha256": io.sha256_file(adapter_dir / "adapters.safetensors")},
        "eval": evaluation,
        "eval_set": {"heldout_ids": [r["id"] for r in lanes.heldout_rows], "control_rows": cfg.control_rows,
                     "max_seq": cfg.max_seq, "lens_positions": cfg.lens_positions,
                     "lens_rows": cfg.lens_rows},
        "lens": {"base": base["heldout"].get("lens"), "tuned": tuned["heldout"].get("lens")},
        "train": _training_figures(cfg, training),
    }


def _training_figures(cfg: AdapterArgs, training: Training) -> dict:
    hist = training.fit["history"]
    steps_timed = [h["step_seconds"] for h in hist[1:]] or [h["step_seconds"] for h in hist]
    return {"steps": cfg.iters, "resumed_from": training.fit["resumed_from"], "seconds": round(training.seconds, 2),
            "step_seconds_median": float(np.median(steps_timed)) if steps_timed else None,
            "tokens_per_second_median": float(np.median([h["tokens_per_second"] for h in hist])) if hist else None,
            "loss_first": hist[0]["loss"] if hist else None, "loss_last": hist[-1]["loss"] if hist else None,
            "mlx_peak_memory_gb": round(training.peak_gb, 3),
            "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "history": hist, "distributed": _distributed_figures(training)}


def _distributed_figures(training: Training) -> dict:
    """World size, backend, each rank's throughput and what one step sends: mlx-lm's
    average_gradients all-sums every trainable gradient (fp32) once per step; a ring all-reduce
    sends 2 (n-1)/n of that per rank."""
    n = training.world["world_size"]
    grad_bytes = 4 * training.trainable_params
    return {**training.world, "ranks": training.fit["ranks"], "allreduce_bytes_per_step": grad_bytes,
            "ring_bytes_sent_per_rank_per_step": int(2 * (n - 1) / n * grad_bytes)}


CONFIG = AdapterArgs  # the dataclass `agp run` makes this stage's flags and --config section from
