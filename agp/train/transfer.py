"""Stage `transfer` (stage 5, transfer part): the transfer dataset, and the raw codecs judged by
what the resumed model does with a transferred state.

Reads the backbone and lanes the runtime stage used (agp.train.runtime.source), the candidate
boundaries (the stage-0 split map's onset layer, the controller's decision layer D, the runtime's
late boundary B) and the stage-2 oracle's route class per probed position.
Steps (each a small function returning a small dataclass):
  inputs           backbone, prompts per split (the transfer lane, else the routing lane), boundaries, labels
  collect          the transfer dataset: states at every boundary for every position, the teacher's
                   top-k logits + logsumexp, the held-out prompts' greedy continuations
  fit_adapters     the learned transfer adapters (agp.transfer.adapter): per boundary and code (width and wire
                   codec), PCA of a pool of training states then the hidden loss; the Fisher-metric code
                   (gradients of the resumed predictions on the dataset's training spans); and KL through the
                   frozen layers [b, L) and the head on those spans, continuing from the Fisher code
  rate_distortion  held-out: every codec and every adapter through AGP-PTP packets into a resumer with its
                   own KV (agp.transfer.measure): KL, top-1, continuation, bytes on the wire, per route class
  equal_bytes      each adapter against the raw codecs at its bytes: it stays only where it wins
  decide           the configuration a split would use, by the stated rule
  end_to_end       the chosen configuration again, its packets carried over a socket (the loopback link)
  write            dataset_L<b>.npz, rate_distortion.json, plots, report
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
from agp.transfer.adapter import AdapterArgs

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
    # CI default leaves out tq3, which sits between tq4 and tq2 on every recorded curve (the adapters' fit
    # needed its time); configs/real-size.yaml sweeps it
    codecs: list = field(default_factory=lambda: [c for c in CODECS if c != "tq3"])
    layers: list | None = None        # boundaries; None: split-map onset, D, late boundary B
    long_prompt_tokens: int = 640     # one span past the 512-token window, resumed at B (0: skip)
    seed: int = 0                     # TurboQuant rotation seed
    pool_prompts: int = 96            # training prompts (every lane) whose states fit the adapters' PCA
    adapter: AdapterArgs = field(default_factory=AdapterArgs)   # the learned transfer adapters
    equal_bytes_tolerance: float = 0.1   # raw codecs within this share above an adapter's bytes count as equal bytes

    def validate(self) -> None:
        if self.long_prompt_tokens < 0:
            raise AGPError(f"--transfer-long-prompt-tokens must be >= 0, got {self.long_prompt_tokens}")
        for name in ("prompts", "heldout_prompts", "max_tokens", "continuation", "top_k"):
            if getattr(self, name) < 1:
                raise AGPError(f"--transfer-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        from agp.quant.registry import make_codec
        self.adapter.validate()
        from agp.transfer.adapter import code_spec
        codes = [code_spec(w, self.adapter.codec)[1] for w in self.adapter.widths]
        for c in [*self.codecs, self.adapter.codec, *codes]:
            make_codec(c, 64)                  # an unknown codec fails before any model work


def run(run, args) -> dict:
    """Build the dataset, sweep the codecs, decide, check end to end; writes <run>/transfer/."""
    t0 = time.perf_counter()
    cfg = config.for_stage(TransferArgs, NAME, args)
    inp = inputs(run, cfg, getattr(args, "model", None))
    data = collect(inp, cfg)
    fitted = fit_adapters(inp, cfg, data)
    table = rate_distortion(inp, cfg, fitted)
    versus = equal_bytes(table.rows, cfg.equal_bytes_tolerance)
    choice = decide(table, inp.late, versus)
    link = end_to_end(inp, cfg, choice, table, fitted)
    long = long_resume(inp, cfg, choice, fitted)
    out = run.stage_dir(NAME)
    write(out, inp, data, table, fitted)
    metrics = stage_metrics(cfg, inp, data, table, choice, link, long, time.perf_counter() - t0, fitted, versus)
    from agp.report.transfer import write_report
    write_report(out, metrics)
    run.update_stage(NAME, artifacts={"dataset": [run.relative(out / f"dataset_L{b}.npz") for b in inp.layers],
                                      "rate_distortion": run.relative(out / "rate_distortion.json"),
                                      "adapters": {n: run.relative(out / "adapters" / adapter_dir(n))
                                                   for n in fitted.adapters}})
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
    pool_rows: list = field(default_factory=list)   # training prompts of every lane, for the adapters' PCA


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
                  route_labels(run), pick(of_lane["heldout"], len(of_lane["heldout"])),
                  pick(src.rows["train"], cfg.pool_prompts))


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
# --- the learned transfer adapters ------------------------------------------------------------------
@dataclass
class Fitted:
    adapters: dict                   # name (ta<width>-<mode>/<codec>) -> TransferAdapter
    fits: dict                       # name -> {"hidden": loss history, "logit": loss history, "seconds": s}
    pool: dict                       # boundary -> training states the PCA saw (sinks excluded)
    skipped_widths: list = field(default_factory=list)   # widths not below the model's hidden size

    def wire(self, name: str) -> tuple[str, object]:
        """(codec, adapter or None) of a table row's configuration."""
        a = self.adapters.get(name)
        return (a.codec, a) if a is not None else (name, None)


def adapter_dir(name: str) -> str:
    return name.replace("/", "_")


def load_fitted(run, bb) -> Fitted:
    """The adapters a finished transfer stage saved (refused if corrupt or for another model)."""
    from agp.transfer.adapter import TransferAdapter
    names = run.stage(NAME).get("artifacts", {}).get("adapters", {})
    got = {n: TransferAdapter.load(Path(run.path) / rel, bb.fingerprint) for n, rel in names.items()}
    return Fitted({n: a for n, (a, _) in got.items()}, {n: meta.get("fit") for n, (_, meta) in got.items()}, {})


def fit_adapters(inp: Inputs, cfg: TransferArgs, data: Dataset) -> Fitted:
    """Per adapter boundary and code (width, wire codec): PCA of the pool then the hidden loss; the
    Fisher-metric code (the pool's states, gradients from the dataset's training spans); and the
    logit-aware fit continuing from the Fisher code (from the hidden fit without training spans)."""
    from agp.transfer.adapter import code_spec, fisher_rows
    a_cfg = cfg.adapter
    layers = sorted({int(x) for x in (a_cfg.layers or [inp.late])})
    # a width that is no bottleneck for this model (a small test model) is left out and recorded
    codes = [code_spec(w, a_cfg.codec) for w in a_cfg.widths]
    skipped = sorted({w for w, _ in codes if w >= inp.bb.hidden_size})
    codes = [(w, c) for w, c in codes if w < inp.bb.hidden_size]
    if not codes or not layers:
        return Fitted({}, {}, {}, skipped)
    pool = pool_states(inp, layers, cfg.max_tokens)
    adapters, fits = {}, {}
    modes = set(a_cfg.modes)
    spans = {b: train_spans(data.arrays[b], "train") if b in data.arrays else [] for b in layers}
    steps = len(layers) * len(codes) * (a_cfg.steps + a_cfg.logit_steps * ("logit" in modes)) \
        + sum(len(v) for v in spans.values()) * bool(modes & {"fisher", "logit"})
    bar = tqdm(total=steps, desc="transfer: fit adapters", unit="step")
    for b in layers:
        valid = train_spans(data.arrays[b], "valid") if b in data.arrays else []
        grads = fisher_rows(inp.bb, b, spans[b], a_cfg.fisher_samples, a_cfg.seed, bar) \
            if spans[b] and modes & {"fisher", "logit"} else None
        for width, codec in codes:
            for a, fit in fit_code(inp.bb, b, pool[b], grads, width, codec, spans[b], valid, a_cfg, bar):
                adapters[a.name], fits[a.name] = a, fit
    bar.close()
    return Fitted(adapters, fits, {b: len(v) for b, v in pool.items()}, skipped)


def fit_code(bb, b: int, pool: np.ndarray, grads, width: int, codec: str, spans: list, valid: list, a_cfg,
             bar) -> list:
    """The (adapter, fit record) of each requested mode for one code at boundary b."""
    import copy
    from agp.transfer.adapter import TransferAdapter, fit_hidden, fit_logit
    modes, out = set(a_cfg.modes), []
    start = None
    if "hidden" in modes or ("logit" in modes and grads is None):
        t0 = time.perf_counter()
        a = TransferAdapter.pca(b, pool, width, a_cfg.rank, "hidden", codec, a_cfg.seed)
        record = {"init": "pca", "hidden": fit_hidden(a, pool, a_cfg, bar), "seconds": time.perf_counter() - t0}
        start = (a, record)
        if "hidden" in modes:
            out.append(start)
    if grads is not None:
        t0 = time.perf_counter()
        a = TransferAdapter.fisher(b, pool, grads, width, a_cfg.rank, "fisher", a_cfg.fisher_alpha, codec, a_cfg.seed)
        start = (a, {"init": "fisher", "fisher_rows": len(grads), "alpha": a_cfg.fisher_alpha,
                     "seconds": time.perf_counter() - t0})
        if "fisher" in modes:
            out.append(start)
    if "logit" in modes and spans and start is not None:
        t0 = time.perf_counter()
        la = copy.copy(start[0])
        la.params, la.mode = copy.deepcopy(start[0].params), "logit"
        out.append((la, {**start[1], "logit": fit_logit(bb, la, spans, a_cfg, bar, valid),
                         "seconds": time.perf_counter() - t0}))
    return out


def pool_states(inp: Inputs, layers: list, max_tokens: int) -> dict:
    """States at each adapter boundary for every pool prompt's positions, attention sinks left out
    (they travel exactly and would dominate the standardisation)."""
    from agp.transfer.resume import SINK_LIMIT
    import mlx.core as mx
    got = {b: [] for b in layers}
    for r in tqdm(inp.pool_rows, desc="transfer: adapter state pool", unit="prompt"):
        ids = inp.bb.encode(r["text"], max_tokens=max_tokens, truncate=True)
        _, _, _, states = inp.bb.states(mx.array([ids]), layers, inp.bb.make_cache(), "transfer adapter pool")
        for b in layers:
            h = np.asarray(states[b][0].astype(mx.float32))
            got[b].append(h[np.abs(h).max(axis=1) <= SINK_LIMIT])
    return {b: np.concatenate(v) for b, v in got.items()}


def train_spans(arrays: dict, split: str) -> list:
    """The dataset's prompts of one split at one boundary as spans with their teacher (logit-aware fit)."""
    from agp.transfer.adapter import Span
    from agp.transfer.resume import SINK_LIMIT
    train = arrays["split"] == split
    out = []
    for prompt in dict.fromkeys(arrays["prompt"][train]):
        r = train & (arrays["prompt"] == prompt)
        h = arrays["states"][r]
        out.append(Span(h, np.abs(h).max(axis=1) > SINK_LIMIT, arrays["topk_ids"][r], arrays["topk_logits"][r],
                        arrays["lse"][r]))
    return out


# --- rate-distortion ---------------------------------------------------------------------------------
@dataclass
class Table:
    rows: list                       # one per (boundary, codec), aggregated over held-out prompts
    by_class: list                   # one per (boundary, codec, route class)
    first: dict = field(default_factory=dict)   # (boundary, codec) -> (teacher, Resumed) of the first held-out prompt


def configurations(inp: Inputs, cfg: TransferArgs, fitted: Fitted) -> list[tuple[int, str]]:
    """(boundary, row name): every raw codec at every boundary, every adapter at its own."""
    return ([(b, c) for b in inp.layers for c in cfg.codecs]
            + [(a.layer, name) for name, a in fitted.adapters.items() if a.layer in inp.layers])


def rate_distortion(inp: Inputs, cfg: TransferArgs, fitted: Fitted) -> Table:
    from agp.transfer.measure import resume, teacher
    acc, first = {}, {}
    held = inp.rows["heldout"]
    confs = configurations(inp, cfg, fitted)
    bar = tqdm(total=len(held) * len(confs), desc="transfer: resume per codec", unit="resume")
    for r in held:
        ids = inp.bb.encode(r["text"], max_tokens=cfg.max_tokens, truncate=True)
        t = teacher(inp.bb, ids, inp.layers, cfg.continuation)
        routes = [inp.labels.get((str(r["id"]), p), "") for p in range(len(ids))]
        for b, name in confs:
            codec, adapter = fitted.wire(name)
            acc.setdefault((b, name), []).append((resume(inp.bb, b, codec, t, cfg.seed, adapter=adapter), routes))
            first.setdefault((b, name), (t, acc[b, name][0][0]))
            bar.update(1)
    bar.close()
    rows = [summarise(b, codec, got, fitted.adapters.get(codec)) for (b, codec), got in acc.items()]
    return Table(rows, [c for (b, codec), got in acc.items() for c in by_route(b, codec, got)], first)


def summarise(b: int, codec: str, got: list, adapter=None) -> dict:
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
            "max_abs_logit_diff": max(g.max_abs_logit_diff for g, _ in got),
            "first_prompt_kl": float(got[0][0].kl.mean()),
            "adapter": None if adapter is None else {"width": adapter.width, "mode": adapter.mode,
                                                     "codec": adapter.codec, "macs_per_state": adapter.macs()}}


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
    within_goal_bytes: dict | None = None   # the lowest-KL configuration that fits the goal's bytes


def equal_bytes(rows: list[dict], tolerance: float = 0.1) -> list[dict]:
    """Each adapter row against the raw codecs at its boundary and bytes: the lowest-KL raw codec with
    at most (1 + tolerance) x the adapter's bytes, or, when every raw codec is larger, the smallest one
    (a comparison the adapter can only lose on bytes). The adapter beats the raw codecs when its KL is
    lower and its top-1 not lower."""
    out = []
    for r in (r for r in rows if r.get("adapter")):
        raw = [x for x in rows if x["layer"] == r["layer"] and not x.get("adapter") and x["codec"] != "f32"]
        if not raw:
            continue
        fits = [x for x in raw if x["bytes_per_token"] <= r["bytes_per_token"] * (1 + tolerance)]
        ref = min(fits, key=lambda x: x["kl"]) if fits else min(raw, key=lambda x: x["bytes_per_token"])
        out.append({"layer": r["layer"], "adapter": r["codec"], "bytes_per_token": r["bytes_per_token"],
                    "kl": r["kl"], "top1": r["top1"], "raw": ref["codec"], "raw_bytes_per_token": ref["bytes_per_token"],
                    "raw_kl": ref["kl"], "raw_top1": ref["top1"], "raw_is_larger": not fits,
                    "beats_raw": bool(r["kl"] < ref["kl"] and r["top1"] >= ref["top1"])})
    return out


def decide(table: Table, late: int, versus: list[dict] | None = None) -> Choice:
    """At the late boundary, among the raw codecs and the adapters that beat them at equal bytes:
    the fewest bytes among configurations that meet the goal's top-1 and KL; when none does, the
    fewest bytes among those within 0.01 of the best top-1 there (the most faithful codecs are f32
    and fp16, and a split pays bytes for every token). Also recorded: the lowest-KL configuration
    within the goal's bytes, what a link that narrow would carry."""
    winners = {v["adapter"] for v in versus or [] if v["beats_raw"]}
    at = [r for r in table.rows if r["layer"] == late and r["codec"] != "f32"
          and (not r.get("adapter") or r["codec"] in winners)]
    ok = [r for r in at if r["top1"] >= GOAL["top1"] and r["kl"] <= GOAL["kl"]]
    if ok:
        row = min(ok, key=lambda r: r["bytes_per_token"])
        why = f"fewest bytes meeting top-1 >= {GOAL['top1']} and KL <= {GOAL['kl']}"
    else:
        best = max(r["top1"] for r in at)
        row = min((r for r in at if r["top1"] >= best - 0.01), key=lambda r: r["bytes_per_token"])
        why = f"no configuration meets top-1 >= {GOAL['top1']} and KL <= {GOAL['kl']}: fewest bytes within 0.01 of the best top-1"
    meets = row in ok and row["bytes_per_token"] <= GOAL["bytes_per_token"]
    narrow = [r for r in at if r["bytes_per_token"] <= GOAL["bytes_per_token"]]
    small = min(narrow, key=lambda r: r["kl"]) if narrow else None
    return Choice(late, row["codec"], row, meets, why,
                  None if small is None else {k: small[k] for k in ("codec", "bytes_per_token", "kl", "top1",
                                                                   "continuation_agreement")})


# --- packets over a socket ------------------------------------------------------------------------------
def end_to_end(inp: Inputs, cfg: TransferArgs, choice: Choice, table: Table, fitted: Fitted) -> dict:
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
        codec, adapter = fitted.wire(choice.codec)
        linked = resume(inp.bb, choice.layer, codec, t, cfg.seed, transport=hop, adapter=adapter)
    finally:
        tx.close()
        rx.close()
    same = bool(np.array_equal(linked.kl, local.kl) and linked.continuation == local.continuation)
    return {"layer": choice.layer, "codec": choice.codec, "frames": frames[0], "identical_to_in_process": same,
            "kl": float(linked.kl.mean()), "top1": float(linked.top1.mean()),
            "continuation_agreement": linked.agreement, "span_bytes": linked.span_bytes}


# --- past the sliding window -----------------------------------------------------------------------------
def long_resume(inp: Inputs, cfg: TransferArgs, choice: Choice, fitted: Fitted) -> list[dict]:
    """One span past the 512-token window resumed at B with f32 (must stay bit for bit: the sliding
    window layers' caches on the resuming host), q8_0 and the chosen codec (whose error compounds
    through every earlier position's KV), and the adapter a link of the goal's bytes would carry. Logits are compared after
    the last max_tokens positions."""
    if not cfg.long_prompt_tokens:
        return []
    from agp.train.runtime import long_prompt
    from agp.transfer.measure import resume, teacher
    ids = long_prompt(inp.bb, inp.long_rows, cfg.long_prompt_tokens)
    t = teacher(inp.bb, ids, [choice.layer], cfg.continuation, tail=cfg.max_tokens)
    rows = []
    narrow = (choice.within_goal_bytes or {}).get("codec")
    for name in dict.fromkeys(["f32", "q8_0", choice.codec] + ([narrow] if narrow in fitted.adapters else [])):
        codec, adapter = fitted.wire(name)
        r = resume(inp.bb, choice.layer, codec, t, cfg.seed, adapter=adapter)
        rows.append({"layer": choice.layer, "codec": name, "tokens": len(ids), "scored_positions": t.tail,
                     "exact_positions": r.exact_positions,
                     "kl": float(r.kl.mean()), "top1": float(r.top1.mean()), "max_abs_logit_diff": r.max_abs_logit_diff,
                     "continuation_agreement": r.agreement, "continuation_identical": r.first_divergence is None})
    return rows


# --- files and metrics ----------------------------------------------------------------------------------
def write(out: Path, inp: Inputs, data: Dataset, table: Table, fitted: Fitted) -> None:
    for b, arrays in data.arrays.items():
        path = out / f"dataset_L{b}.npz"
        with io.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        data.sha256[path.name] = io.sha256_file(path)
    io.write_json(out / "continuations.json", data.continuations)
    data.sha256["continuations.json"] = io.sha256_file(out / "continuations.json")
    io.write_json(out / "rate_distortion.json", {"rows": table.rows, "by_route": table.by_class})
    for name, a in fitted.adapters.items():
        with io.atomic_dir(out / "adapters" / adapter_dir(name)) as tmp:
            a.save(tmp, {"model_fingerprint": inp.bb.fingerprint, "name": name, "fit": fitted.fits[name]})


def stage_metrics(cfg, inp: Inputs, data: Dataset, table: Table, choice: Choice, link: dict, long: list,
                  seconds: float, fitted: Fitted, versus: list[dict]) -> dict:
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
                         "meets_goal": choice.meets_goal, "goal": GOAL, "within_goal_bytes": choice.within_goal_bytes,
                         "adapters_on_critical_path": sorted(v["adapter"] for v in versus if v["beats_raw"]),
                         "equal_bytes_tolerance": cfg.equal_bytes_tolerance},
            "equal_bytes": versus,
            "adapters": {"pool_states": fitted.pool, "fits": fitted.fits, "skipped_widths": fitted.skipped_widths,
                         "pool_prompts": len(inp.pool_rows)},
            "end_to_end": link, "long_span": long,
            "headline": {"top1": choice.row["top1"], "kl": choice.row["kl"],
                         "bytes_per_token": choice.row["bytes_per_token"], "codec": choice.codec},
            "seconds": seconds}


CONFIG = TransferArgs  # the dataclass `agp run` makes this stage's flags and --config section from
