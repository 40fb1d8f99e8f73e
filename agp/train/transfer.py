"""Stage `transfer` (stage 5, transfer part): the transfer dataset, and the raw codecs judged by
what the resumed model does with a transferred state.

Reads the backbone and lanes the runtime stage used (agp.train.runtime.source), the candidate
boundaries (the stage-0 split map's onset layer, the controller's decision layer D, the runtime's
late boundary B) and the stage-2 oracle's route class per probed position.
Steps (each a small function returning a small dataclass):
  inputs           backbone, prompts per split (the transfer lane, else the routing lane), boundaries, labels
  collect          the transfer dataset: states at every boundary for every position, the teacher's
                   top-k logits + logsumexp, the held-out prompts' greedy continuations
  rate_distortion  held-out: every codec at every boundary through AGP-PTP packets into a resumer with its
                   own KV (agp.transfer.measure): KL, top-1, continuation, bytes on the wire, per route class
  decide           the configuration a split would use, by the stated rule
  end_to_end       the chosen configuration again, its packets carried over a socket (the loopback link)
  write            dataset_L<b>.npz, rate_distortion.json, plots, report
The learned transfer adapter (issue 18, items 3-4) is the next increment: today every row is a raw codec.
"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agp import config, io
from agp.config import ConfigMixin
from agp.errors import AGPError
from agp.train.runtime import SPLITS

NAME = "transfer"
MARKER = "stage5"
REQUIRES = ["baseline", "controller", "runtime"]   # split map, D and route labels, late boundary and lanes
HEADLINE = {"resumed top-1 at B": "headline.top1", "resumed KL at B": "headline.kl",
            "bytes / token": "headline.bytes_per_token"}
# f32 is the resume check (bitwise-identical logits); the rest is the rate-distortion sweep
CODECS = ("f32", "fp16", "q8_0", "tq8", "tq4", "tq3", "tq2")
GOAL = {"top1": 0.99, "kl": 0.05, "bytes_per_token": 128}    # the goal at the late boundary


@dataclass
class TransferArgs(ConfigMixin):
    # CI size: ~2 minutes on 2 shared cores; configs/real-size.yaml holds the offline size.
    prompts: int = 16                 # train prompts in the dataset (valid: a quarter of it)
    heldout_prompts: int = 4          # held-out prompts: the dataset's and the rate-distortion table's
    max_tokens: int = 48              # tokens per prompt (the span sent in one packet)
    continuation: int = 4             # greedy tokens resumed after each held-out span
    top_k: int = 32                   # teacher logits stored per position (with the logsumexp)
    codecs: list = field(default_factory=lambda: list(CODECS))
    layers: list | None = None        # boundaries; None: split-map onset, D, late boundary B
    long_prompt_tokens: int = 640     # one span past the 512-token window, resumed at B (0: skip)
    seed: int = 0                     # TurboQuant rotation seed

    def validate(self) -> None:
        if self.long_prompt_tokens < 0:
            raise AGPError(f"--transfer-long-prompt-tokens must be >= 0, got {self.long_prompt_tokens}")
        for name in ("prompts", "heldout_prompts", "max_tokens", "continuation", "top_k"):
            if getattr(self, name) < 1:
                raise AGPError(f"--transfer-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        from agp.quant.registry import make_codec
        for c in self.codecs:
            make_codec(c, 64)                  # an unknown codec fails before any model work


def run(run, args) -> dict:
    """Build the dataset, sweep the codecs, decide, check end to end; writes <run>/transfer/."""
    t0 = time.perf_counter()
    cfg = config.for_stage(TransferArgs, NAME, args)
    inp = inputs(run, cfg, getattr(args, "model", None))
    data = collect(inp, cfg)
    table = rate_distortion(inp, cfg)
    choice = decide(table, inp.late)
    link = end_to_end(inp, cfg, choice, table)
    long = long_resume(inp, cfg, choice)
    out = run.stage_dir(NAME)
    write(out, inp, data, table)
    metrics = stage_metrics(cfg, inp, data, table, choice, link, long, time.perf_counter() - t0)
    from agp.report.transfer import write_report
    write_report(out, metrics)
    run.update_stage(NAME, artifacts={"dataset": [run.relative(out / f"dataset_L{b}.npz") for b in inp.layers],
                                      "rate_distortion": run.relative(out / "rate_distortion.json")})
    return metrics


# --- inputs ---------------------------------------------------------------------------------------
@dataclass
class Inputs:
    bb: object
    rows: dict                       # split -> prompt rows
    lane: str                        # the lane the prompts come from
    adapter_dir: str | None
    layers: list                     # boundaries, sorted
    onset: int
    decision: int
    late: int
    labels: dict                     # (prompt id, position) -> route class name
    long_rows: list                  # every held-out row of the lane, for the span past the window


def inputs(run, cfg: TransferArgs, model=None) -> Inputs:
    from agp.runtime import heads as H
    from agp.train.runtime import pick, source
    for stage in REQUIRES:
        run.require(stage, NAME)
    src = source(run, model)
    bb = src.bb
    onset = int(run.stage("baseline")["metrics"]["split_map"]["onset_layer"])
    calib = json.loads((Path(run.path) / "controller" / "heads" / "calibration.json").read_text())
    late = int(H.backbone_source(run).get("late_boundary", [bb.n_layers - 3])[0])
    layers = sorted({int(x) for x in (cfg.layers or [onset, int(calib["decision_layer"]), late])})
    if not 0 < layers[0] or layers[-1] >= bb.n_layers:
        raise AGPError(f"transfer boundaries {layers} must lie in 1..{bb.n_layers - 1}; pick --transfer-layers there")
    lane = "transfer" if any(r["lane"] == "transfer" for r in src.rows["train"]) else "routing"
    want = {"train": cfg.prompts, "valid": max(1, cfg.prompts // 4), "heldout": cfg.heldout_prompts}
    of_lane = {s: [r for r in src.rows[s] if r["lane"] == lane] or src.rows[s] for s in SPLITS}
    rows = {s: pick(of_lane[s], want[s]) for s in SPLITS}
    return Inputs(bb, rows, lane, src.adapter_dir, layers, onset, int(calib["decision_layer"]), late,
                  route_labels(run), pick(of_lane["heldout"], len(of_lane["heldout"])))


def route_labels(run) -> dict:
    """The stage-2 oracle's route class at every position it probed."""
    from agp.oracle.labels import ROUTES
    with np.load(Path(run.path) / "controller" / "oracle.npz") as z:
        return {(str(p), int(q)): ROUTES[int(r)] for p, q, r in zip(z["prompt"], z["position"], z["route"])}


# --- the dataset ------------------------------------------------------------------------------------
@dataclass
class Dataset:
    arrays: dict                     # boundary -> {name: array} (one row per position)
    continuations: dict              # held-out prompt id -> k greedy tokens
    sha256: dict                     # file name -> sha256 (filled by write)
    rows: dict                       # split -> positions
    routes: dict                     # split -> {route class: share of its labelled positions}


def collect(inp: Inputs, cfg: TransferArgs) -> Dataset:
    """Every position of every chosen prompt: its states at each boundary and the teacher."""
    from agp.transfer.measure import teacher
    cols = {b: {k: [] for k in ("states", "topk_ids", "topk_logits", "lse")} for b in inp.layers}
    meta = {k: [] for k in ("prompt", "position", "split", "route")}
    conts = {}
    prompts = [(s, r) for s in SPLITS for r in inp.rows[s]]
    for split, r in tqdm(prompts, desc="transfer dataset", unit="prompt"):
        ids = inp.bb.encode(r["text"], max_tokens=cfg.max_tokens, truncate=True)
        k = cfg.continuation if split == "heldout" else 0
        t = teacher(inp.bb, ids, inp.layers, k)
        ids_k, logits_k, lse = top_k(t.logits, cfg.top_k)
        for b in inp.layers:
            for name, v in (("states", t.states[b]), ("topk_ids", ids_k), ("topk_logits", logits_k), ("lse", lse)):
                cols[b][name].append(v)
        meta["prompt"] += [str(r["id"])] * len(ids)
        meta["position"] += list(range(len(ids)))
        meta["split"] += [split] * len(ids)
        meta["route"] += [inp.labels.get((str(r["id"]), p), "") for p in range(len(ids))]
        if k:
            conts[str(r["id"])] = t.continuation
    shared = {k: np.asarray(v) for k, v in meta.items()}
    arrays = {b: {**{k: np.concatenate(v) for k, v in c.items()}, **shared} for b, c in cols.items()}
    return Dataset(arrays, conts, {}, {s: int((shared["split"] == s).sum()) for s in SPLITS}, route_shares(shared))


def route_shares(meta: dict) -> dict:
    """Per split, each route class's share of the positions the oracle labelled: the splits are
    the lanes' by prompt, and this is how far their class mix differs."""
    out = {}
    for s in SPLITS:
        labelled = meta["route"][(meta["split"] == s) & (meta["route"] != "")]
        names, counts = np.unique(labelled, return_counts=True)
        out[s] = {"labelled": int(len(labelled)), **{str(n): float(c / len(labelled)) for n, c in zip(names, counts)}}
    return out


def top_k(logits, k: int):
    """(ids [n, k], logits [n, k], logsumexp [n]) of full-depth logits [n, V]: KL against any
    distribution is exact to the teacher mass outside the top k (stored with the rate table)."""
    import mlx.core as mx
    part = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]      # a full sort of 262K logits costs ~20x more
    order = mx.argsort(-mx.take_along_axis(logits, part, axis=-1), axis=-1)
    idx = mx.take_along_axis(part, order, axis=-1)
    vals = mx.take_along_axis(logits, idx, axis=-1)
    lse = mx.logsumexp(logits, axis=-1)
    mx.eval(idx, vals, lse)
    return np.asarray(idx, np.int32), np.asarray(vals, np.float32), np.asarray(lse, np.float32)


# --- rate-distortion ---------------------------------------------------------------------------------
@dataclass
class Table:
    rows: list                       # one per (boundary, codec), aggregated over held-out prompts
    by_class: list                   # one per (boundary, codec, route class)
    first: dict = field(default_factory=dict)   # (boundary, codec) -> (teacher, Resumed) of the first held-out prompt


def rate_distortion(inp: Inputs, cfg: TransferArgs) -> Table:
    from agp.transfer.measure import resume, teacher
    acc, first = {}, {}
    held = inp.rows["heldout"]
    bar = tqdm(total=len(held) * len(inp.layers) * len(cfg.codecs), desc="transfer: resume per codec", unit="resume")
    for r in held:
        ids = inp.bb.encode(r["text"], max_tokens=cfg.max_tokens, truncate=True)
        t = teacher(inp.bb, ids, inp.layers, cfg.continuation)
        routes = [inp.labels.get((str(r["id"]), p), "") for p in range(len(ids))]
        for b in inp.layers:
            for codec in cfg.codecs:
                acc.setdefault((b, codec), []).append((resume(inp.bb, b, codec, t, cfg.seed), routes))
                first.setdefault((b, codec), (t, acc[b, codec][0][0]))
                bar.update(1)
    bar.close()
    rows = [summarise(b, codec, got) for (b, codec), got in acc.items()]
    return Table(rows, [c for (b, codec), got in acc.items() for c in by_route(b, codec, got)], first)


def summarise(b: int, codec: str, got: list) -> dict:
    kl = np.concatenate([g.kl for g, _ in got])
    top1 = np.concatenate([g.top1 for g, _ in got])
    positions = sum(len(g.kl) for g, _ in got)
    firsts = [g.first_divergence for g, _ in got]
    return {"layer": b, "codec": codec, "prompts": len(got), "positions": positions,
            "bytes_per_token": sum(g.span_bytes for g, _ in got) / sum(len(g.kl) - g.exact_positions for g, _ in got),
            "exact_bytes": float(np.mean([g.exact_bytes for g, _ in got])),
            "exact_positions": float(np.mean([g.exact_positions for g, _ in got])),
            "all_in_bytes_per_token": sum(g.span_bytes + g.exact_bytes for g, _ in got) / positions,
            "step_packet_bytes": float(np.nanmean([g.step_bytes for g, _ in got])),
            "cosine": float(np.mean([g.cosine for g, _ in got])), "mse": float(np.mean([g.mse for g, _ in got])),
            "kl": float(kl.mean()), "kl_p95": float(np.percentile(kl, 95)), "top1": float(top1.mean()),
            "continuation_agreement": float(np.mean([g.agreement for g, _ in got])),
            "first_divergence_min": min((f for f in firsts if f is not None), default=None),
            "continuations_identical": sum(f is None for f in firsts),
            "max_abs_logit_diff": max(g.max_abs_logit_diff for g, _ in got)}


def by_route(b: int, codec: str, got: list) -> list[dict]:
    kl = np.concatenate([g.kl for g, _ in got])
    top1 = np.concatenate([g.top1 for g, _ in got])
    routes = np.concatenate([np.asarray(r, dtype=object) for _, r in got])
    return [{"layer": b, "codec": codec, "route": c, "positions": int((routes == c).sum()),
             "kl": float(kl[routes == c].mean()), "top1": float(top1[routes == c].mean())}
            for c in sorted(set(routes) - {""})]


# --- the decision ------------------------------------------------------------------------------------
@dataclass
class Choice:
    layer: int
    codec: str
    row: dict
    meets_goal: bool
    why: str


def decide(table: Table, late: int) -> Choice:
    """At the late boundary: the fewest bytes among codecs that meet the goal's top-1 and KL; when
    none does, the fewest bytes among those within 0.01 of the best top-1 there (the most faithful
    codecs are f32 and fp16, and a split pays bytes for every token)."""
    at = [r for r in table.rows if r["layer"] == late and r["codec"] != "f32"]
    ok = [r for r in at if r["top1"] >= GOAL["top1"] and r["kl"] <= GOAL["kl"]]
    if ok:
        row = min(ok, key=lambda r: r["bytes_per_token"])
        why = f"fewest bytes meeting top-1 >= {GOAL['top1']} and KL <= {GOAL['kl']}"
    else:
        best = max(r["top1"] for r in at)
        row = min((r for r in at if r["top1"] >= best - 0.01), key=lambda r: r["bytes_per_token"])
        why = f"no codec meets top-1 >= {GOAL['top1']} and KL <= {GOAL['kl']}: fewest bytes within 0.01 of the best top-1"
    meets = row in ok and row["bytes_per_token"] <= GOAL["bytes_per_token"]
    return Choice(late, row["codec"], row, meets, why)


# --- packets over a socket ------------------------------------------------------------------------------
def end_to_end(inp: Inputs, cfg: TransferArgs, choice: Choice, table: Table) -> dict:
    """The chosen configuration on the first held-out prompt with every packet carried over a
    socket pair (length-prefixed frames, bounded timeouts) before the resumer reads it; the
    result must equal the table's in-process resume of that prompt, or the table is not what a
    second host would see."""
    from agp.ptp.loopback import recv_frame, send_frame
    from agp.transfer.measure import resume
    t, local = table.first[choice.layer, choice.codec]
    tx, rx = socket.socketpair()
    for s in (tx, rx):
        s.settimeout(5.0)
    frames = [0]

    def hop(data: bytes) -> bytes:
        send_frame(tx, data)
        frames[0] += 1
        return recv_frame(rx)

    try:
        linked = resume(inp.bb, choice.layer, choice.codec, t, cfg.seed, transport=hop)
    finally:
        tx.close()
        rx.close()
    same = bool(np.array_equal(linked.kl, local.kl) and linked.continuation == local.continuation)
    return {"layer": choice.layer, "codec": choice.codec, "frames": frames[0], "identical_to_in_process": same,
            "kl": float(linked.kl.mean()), "top1": float(linked.top1.mean()),
            "continuation_agreement": linked.agreement, "span_bytes": linked.span_bytes}


# --- past the sliding window -----------------------------------------------------------------------------
def long_resume(inp: Inputs, cfg: TransferArgs, choice: Choice) -> list[dict]:
    """One span past the 512-token window resumed at B with f32 (must stay bit for bit: the sliding
    window layers' caches on the resuming host), q8_0 and the chosen codec (whose error compounds
    through every earlier position's KV). Logits are compared after the last max_tokens positions."""
    if not cfg.long_prompt_tokens:
        return []
    from agp.train.runtime import long_prompt
    from agp.transfer.measure import resume, teacher
    ids = long_prompt(inp.bb, inp.long_rows, cfg.long_prompt_tokens)
    t = teacher(inp.bb, ids, [choice.layer], cfg.continuation, tail=cfg.max_tokens)
    rows = []
    for codec in dict.fromkeys(["f32", "q8_0", choice.codec]):
        r = resume(inp.bb, choice.layer, codec, t, cfg.seed)
        rows.append({"layer": choice.layer, "codec": codec, "tokens": len(ids), "scored_positions": t.tail,
                     "exact_positions": r.exact_positions,
                     "kl": float(r.kl.mean()), "top1": float(r.top1.mean()), "max_abs_logit_diff": r.max_abs_logit_diff,
                     "continuation_agreement": r.agreement, "continuation_identical": r.first_divergence is None})
    return rows


# --- files and metrics ----------------------------------------------------------------------------------
def write(out: Path, inp: Inputs, data: Dataset, table: Table) -> None:
    for b, arrays in data.arrays.items():
        path = out / f"dataset_L{b}.npz"
        with io.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        data.sha256[path.name] = io.sha256_file(path)
    io.write_json(out / "continuations.json", data.continuations)
    data.sha256["continuations.json"] = io.sha256_file(out / "continuations.json")
    io.write_json(out / "rate_distortion.json", {"rows": table.rows, "by_route": table.by_class})


def stage_metrics(cfg, inp: Inputs, data: Dataset, table: Table, choice: Choice, link: dict, long: list,
                  seconds: float) -> dict:
    f32 = [r for r in table.rows if r["codec"] == "f32"]
    split_of = {}
    for s in SPLITS:
        for r in inp.rows[s]:
            split_of.setdefault(str(r["id"]), set()).add(s)
    return {"config": cfg.to_dict(), "backbone": "adapter" if inp.adapter_dir else "base", "lane": inp.lane,
            "model_fingerprint": inp.bb.fingerprint, "layers": inp.layers,
            "boundaries": {"onset": inp.onset, "decision": inp.decision, "late": inp.late},
            "dataset": {"positions": data.rows, "route_shares": data.routes, "sha256": data.sha256, "top_k": cfg.top_k,
                        "stored": "states at each boundary (float32), teacher top-k ids and logits, logsumexp",
                        "prompts_in_two_splits": sum(len(v) > 1 for v in split_of.values()),
                        "digest": hashlib.sha256(json.dumps(data.sha256, sort_keys=True).encode()).hexdigest()},
            "rate_distortion": table.rows, "by_route": table.by_class,
            "f32_resume_exact": all(r["max_abs_logit_diff"] == 0.0 and r["continuations_identical"] == r["prompts"]
                                    for r in f32),
            "decision": {"layer": choice.layer, "codec": choice.codec, "why": choice.why,
                         "meets_goal": choice.meets_goal, "goal": GOAL, "adapter": "not built yet (raw codecs only)"},
            "end_to_end": link, "long_span": long,
            "headline": {"top1": choice.row["top1"], "kl": choice.row["kl"],
                         "bytes_per_token": choice.row["bytes_per_token"], "codec": choice.codec},
            "seconds": seconds}


CONFIG = TransferArgs  # the dataclass `agp run` makes this stage's flags and --config section from
