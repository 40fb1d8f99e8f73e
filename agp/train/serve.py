"""Stage `serve` (stage 5, two-host part): the resume server measured against one host and
against the naive split, on the run's backbone and draft head, over loopback and emulated links.

Steps (each returns a small dict; agp.serve.measure holds the measurements):
  setup        backbone, the runtime stage's draft head, the split b, held-out prompts plus one
               past the 512-token sliding window
  modes        single host (full, speculative), the naive split and two-host speculative at each
               emulated round trip; tokens compared with full depth
  ring         the naive split on MLX's own distributed engine (`mlx.launch --backend ring`)
  reliability  ping latency, concurrent clients, a server restart mid-session, bad frames, short sessions
  write        serve.json, the tok/s-against-RTT plot, the report
CI size keeps it to a few minutes; configs/real-size.yaml and `agp bench serve` hold the long runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from agp import config, io
from agp.config import ConfigMixin
from agp.errors import AGPError

NAME = "serve"
MARKER = "stage5"
REQUIRES = ["runtime"]                      # the draft head and the backbone it was made on
HEADLINE = {"two-host lossless = full": "headline.lossless_equal",
            "tok/s vs naive split @5ms": "headline.speculative_vs_naive_at_max_rtt",
            "ping p50 ms": "headline.ping_p50_ms"}


LOSSLESS = ("naive split", "two-host speculative")     # with f32 on the wire their tokens are full depth's


@dataclass
class ServeStageArgs(ConfigMixin):
    # CI size: ~3 minutes on 2 shared cores; configs/real-size.yaml holds the offline size.
    prompts: int = 1                  # held-out prompts per layout (plus the long one)
    max_prompt_tokens: int = 96
    new_tokens: int = 24
    long_prompt_tokens: int = 600     # one prompt past the 512-token window (0: skip)
    split: int | None = None          # None: the draft layer E (the exit draft runs on the reflex side)
    rtts_ms: list = field(default_factory=lambda: [0.0, 0.3, 5.0])
    codec: str = "f32"
    ring: bool = True                 # the mx.distributed naive split (two processes)
    clients: int = 8
    requests: int = 50
    short_sessions: int = 200
    pings: int = 300

    def validate(self) -> None:
        for name in ("prompts", "new_tokens", "clients", "requests", "pings", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise AGPError(f"--serve-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if any(r < 0 for r in self.rtts_ms) or not self.rtts_ms:
            raise AGPError(f"--serve-rtts-ms must be non-negative round trips in ms, got {self.rtts_ms}")


def run(run, args) -> dict:
    t0 = time.perf_counter()
    cfg = config.for_stage(ServeStageArgs, NAME, args)
    su = setup(run, cfg, getattr(args, "model", None))
    table = layouts(su, cfg)
    ring = ring_split(su, cfg)
    rel = reliability(su, cfg)
    metrics = stage_metrics(cfg, su, table, ring, rel, time.perf_counter() - t0)
    out = run.stage_dir(NAME)
    io.write_json(out / "serve.json", metrics)
    from agp.report.serve import write_report
    write_report(out, metrics)
    run.update_stage(NAME, artifacts={"serve": run.relative(out / "serve.json")})
    return metrics


def setup(run, cfg: ServeStageArgs, model=None):
    from agp.runtime import heads as H
    from agp.serve.measure import Setup
    from agp.train.runtime import SPLITS, long_prompt, pick, source
    run.require("runtime", NAME)
    src = source(run, model)
    bb = src.bb
    # the routed mode's controller too, when the run has it (the lossy two-host row)
    heads = H.load(run, bb, "routed" if run.stage("controller").get("status") == "done" else "speculative")
    E = heads.draft_layer if heads.draft_kind == "exit" else None
    split = cfg.split if cfg.split is not None else (E or bb.n_layers // 2)
    if not 0 < split < bb.n_layers:
        raise AGPError(f"--serve-split {split} must lie in 1..{bb.n_layers - 1}")
    if E is not None and split < E:
        raise AGPError(f"--serve-split {split} is before the exit draft's layer {E}, which runs on the reflex side")
    rows = pick(src.rows[SPLITS[2]], cfg.prompts)
    prompts = [bb.encode(r["text"], max_tokens=cfg.max_prompt_tokens, truncate=True) for r in rows]
    if cfg.long_prompt_tokens:
        # a model with a short context (the tiny test models) gets the longest prompt it can take
        room = bb.config.get("max_position_embeddings", 32768) - cfg.new_tokens
        prompts.append(long_prompt(bb, pick(src.rows[SPLITS[2]], len(src.rows[SPLITS[2]])),
                                   min(cfg.long_prompt_tokens, room)))
    return Setup(bb, heads, split, prompts, cfg.new_tokens)


def layouts(su, cfg: ServeStageArgs) -> dict:
    from agp.serve.measure import modes
    return modes(su, list(cfg.rtts_ms), cfg.codec)


def ring_split(su, cfg: ServeStageArgs) -> dict | None:
    """The naive split on mx.distributed, on the first prompt (its tokens compared with full)."""
    if not cfg.ring:
        return None
    from dataclasses import asdict

    from agp.serve.measure import generate
    from agp.serve.ring import RingSplitArgs, run_ring_split
    full, row = generate(type(su)(su.bb, None, su.split, su.prompts[:1], su.new_tokens), "full")
    got = run_ring_split(RingSplitArgs(model=str(su.bb.path), adapter=su.bb.adapter, split=su.split,
                                       new_tokens=su.new_tokens, prompt_ids=list(su.prompts[0]), stop_at_eos=False))
    out = asdict(got)
    out.update(tok_s=got.tokens_per_s, bytes_up_per_token=got.state_bytes_per_token,
               equal_full=list(got.tokens) == full[0], single_host_tok_s=row["tok_s"])
    return out


def reliability(su, cfg: ServeStageArgs) -> dict:
    from agp.serve import measure as M
    from agp.serve.server import ResumeServer, ServeArgs, ServerThread
    with ServerThread(ResumeServer(su.bb, su.split, ServeArgs(port=0))) as srv:
        ping = M.ping(srv.address, cfg.pings)
    return {"ping": ping, "concurrency": M.concurrency(su.bb, su.split, cfg.clients, cfg.requests),
            "restart": M.restart(su), "bad_frames": M.bad_frames(su.bb, su.split),
            "sessions": M.sessions(su.bb, su.split, cfg.short_sessions)}


def stage_metrics(cfg, su, table: dict, ring, rel: dict, seconds: float) -> dict:
    rows = table["rows"]
    two = [r for r in rows if r["layout"] != "single host"]
    top = max(cfg.rtts_ms)

    def at(layout, rtt):
        return next((r for r in rows if r["layout"] == layout and r["rtt_ms"] == rtt), None)
    spec, naive = at("two-host speculative", top), at("naive split", top)
    return {"config": cfg.to_dict(), "model_fingerprint": su.bb.fingerprint, "split": su.split,
            "draft": {"kind": su.heads.draft_kind, "layer": su.heads.draft_layer},
            "prompt_tokens": [len(p) for p in su.prompts], "layouts": table, "ring": ring, "reliability": rel,
            "headline": {"lossless_equal": all(r["equal_full"] for r in two if r["layout"] in LOSSLESS)
                         if cfg.codec == "f32" else None,
                         "speculative_vs_naive_at_max_rtt": spec["tok_s"] / naive["tok_s"] if spec and naive else None,
                         "ping_p50_ms": rel["ping"]["p50_ms"], "max_rtt_ms": top},
            "seconds": seconds}


CONFIG = ServeStageArgs
