"""Stage `runtime`: shortlist exit heads, then every generation mode measured on the same prompts.

Reads the backbone the controller used (the stage-1 adapter when it finished) and the lanes.
Steps (each a small function returning a small dataclass):
  source          backbone + lane rows (train / valid / heldout)
  collect_states  hidden states after E blocks and after all blocks at train/valid positions
  sweep_exits     per exit layer E x shortlist size V: identity, ridge and distilled heads;
                  acceptance (top-1 agreement with full depth), KL, coverage, MACs and ms per call
  save_heads      one distilled head per exit layer (the V the sweep favours) + runtime.json
  benchmark       mlx_lm.generate (anchor), full, speculative, exit:L, entropy, routed on held-out
                  prompts (one over 600 tokens) in one process
  write_report    metrics, report fragment, quality-vs-MACs frontier plot
Outputs in <run>/runtime/: exit_heads/L<E>/, runtime.json, sweep.json, bench.json, report.md, PNGs.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from agp import config, io
from agp.config import ConfigMixin
from agp.errors import AGPError
from agp.train.draft import VERIFY_POSITION_COST, chain_table, exit_chains, fit_feature_draft, time_ms

NAME = "runtime"
MARKER = "stage5"
ALIASES = {"bench_new_tokens": ["runtime-new-tokens"]}  # flag name kept from before
HEADLINE = {"speculative tok/s vs mlx-lm": "headline.speculative_tok_s_ratio",
            "acceptance": "headline.speculative_acceptance", "lossless": "headline.speculative_identical"}
REQUIRES = ["baseline", "controller"]   # the adapter and its lanes are used when stage 1 finished
LANES = ("sft", "routing", "semantic")
SPLITS = ("train", "valid", "heldout")
TAUS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class RuntimeArgs(ConfigMixin):
    # CI size: fits the 4-minute budget on 2 shared cores; configs/real-size.yaml is the offline size.
    prompts: int = 32                 # train prompts whose states feed the heads (a quarter as many valid)
    max_tokens: int = 128             # tokens per prompt for the states (every position is used)
    exit_layers: list = field(default_factory=lambda: [6, 9, 12, 15])   # 12 = controller D, 15 = late boundary
    vocab: int = 4096                 # shortlist size of the saved heads (every exit layer)
    vocabs: list = field(default_factory=lambda: [1024, 16384])   # other sizes: identity + ridge only
    vocab_layers: list | None = None  # layers the other sizes are swept at (None: every exit layer)
    head_steps: int = 100             # 150 steps x 256 on 1.5K positions overfit (train KL 0.15, valid 1.9)
    head_batch: int = 128             # positions per distillation step
    head_lr: float = 3e-4             # distillation learning rate (Adam)
    # the EAGLE-style feature draft head (speculative:feature). Off at CI size: there it trains far
    # short of convergence (400 steps x 256 on 8K pairs reach valid top-1 0.20, train loss still
    # falling), the cost model keeps the exit draft, and it cost 72 s of a 300 s fresh-clone CI stage;
    # configs/real-size.yaml turns it on with the data and steps EAGLE-style heads need.
    feature_draft: bool = False       # train the EAGLE-style feature draft head (speculative:feature)
    draft_prompts: int = 32           # more train prompts for the feature draft head (final states only)
    draft_steps: int = 150            # its distillation steps (batch 256)
    draft_inner: int = 1024           # MLP width of its block
    draft_lr: float = 1e-3
    bench_prompts: int = 2            # held-out prompts decoded by the speed modes (plus one over 600 tokens)
    lossy_prompts: int = 1            # of those, how many the lossy modes (exit:L, entropy, routed) decode
    bench_new_tokens: int = 32        # tokens each mode decodes per benchmark prompt
    long_prompt_tokens: int = 640     # the long benchmark prompt: past the 512-token window
    draft_max: int = 4                # most drafts per speculative round (the cost model may pick fewer)
    draft_min_confidence: float = 0.3  # lowest draft gate the cost model considers
    entropy_thresholds: list = field(default_factory=lambda: [0.5, 0.8])  # CALM softmax-confidence exits swept
    routed_gates: list = field(default_factory=lambda: [0.6])   # abstain gates swept besides the calibrated one
    skipped_kv: list = field(default_factory=lambda: ["catchup", "propagate"])  # entropy/routed KV strategies benchmarked
    late_boundary: int | None = None  # routed: continue_local exits here (None: n - 3, after D)
    seed: int = 0                     # head initialisation and batch order

    def validate(self) -> None:
        self.exit_layers = sorted({int(layer) for layer in self.exit_layers})
        self.vocabs = sorted({int(v) for v in self.vocabs})
        for name in ("bench_prompts", "bench_new_tokens", "head_steps", "prompts", "long_prompt_tokens",
                     "vocab", "head_batch", "max_tokens", "draft_max", "draft_steps", "draft_inner"):
            if getattr(self, name) < 1:
                raise AGPError(f"--runtime-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def routed_layers(run, n: int, cfg: RuntimeArgs) -> tuple[list[int], int]:
    """Exit layers to train: the swept ones plus the controller's decision layer D and the late
    boundary B (default n - 3, and always after D), which mode routed exits at."""
    calib = Path(run.path) / "controller" / "heads" / "calibration.json"
    d = int(json.loads(calib.read_text())["decision_layer"]) if calib.exists() else None
    late = cfg.late_boundary or (max(n - 3, d + 1) if d is not None else n - 3)
    extra = {late} | ({d} if d is not None else set())
    return sorted(set(cfg.exit_layers) | {x for x in extra if 0 < x < n}), late


# --- source ---------------------------------------------------------------------------------------
@dataclass
class Source:
    bb: object
    adapter_dir: str | None
    rows: dict                       # split -> list of lane rows (dicts with 'id', 'text', 'lane')


def resolve_adapter(run) -> str | None:
    """The stage-1 adapter directory; a relative path is tried against the run's own copy too."""
    ad = run.stage("adapter")
    if ad.get("status") != "done":
        return None
    adir = run.artifact("adapter", "adapter_dir")
    for cand in ([adir] if adir else []) + [Path(run.path) / "adapter" / "adapter"]:
        if (cand / "adapter_config.json").exists():
            return str(cand.resolve())
    raise AGPError(f"adapter stage of {run.path} finished but its adapter ({adir}) is missing; "
                   f"rerun `agp run --stage adapter`")


def source(run, model_arg=None) -> Source:
    from agp.backbone import load
    adapter = resolve_adapter(run)
    return Source(load(model_arg, adapter=adapter), adapter, source_rows(run))


def source_rows(run) -> dict:
    """Lane rows per split: the stage-1 lanes (sft, routing, semantic) when the adapter stage
    finished, else the offline prompt pack split by content hash (as the controller does)."""
    if run.stage("adapter").get("status") != "done":
        from agp.data.prompt_pack import PromptPackArgs, build_prompt_pack
        rows = {s: [] for s in SPLITS}
        for r in build_prompt_pack(PromptPackArgs(per_source=40, max_chars=1200)):
            rows["valid" if r["split"] == "valid" else "heldout" if r["split"] in ("heldout", "test") else "train"].append(
                {"id": r["id"], "text": r["text"], "lane": "routing"})
        return rows
    data = Path(run.path) / "adapter" / "data"
    rows = {s: [] for s in SPLITS}
    for lane in LANES:
        for s in SPLITS:
            path = data / lane / f"{s}.jsonl"
            if not path.exists():
                raise AGPError(f"missing lane file {path}; rerun `agp run --stage adapter`")
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    if isinstance(r.get("text"), str) and r["text"].strip():
                        rows[s].append({"id": r.get("id"), "text": r["text"], "lane": lane})
    if not rows["train"] or not rows["heldout"]:
        raise AGPError(f"the lanes under {data} have no train or held-out rows; rerun `agp run --stage adapter`")
    return rows


def pick(rows: list[dict], n: int) -> list[dict]:
    """A deterministic, content-hash-ordered sample of n rows (mixes the lanes like the source)."""
    import hashlib
    return sorted(rows, key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())[:n]


# --- hidden states --------------------------------------------------------------------------------
@dataclass
class States:
    hidden: dict                     # layer -> [N, H] float32 (the last layer n included)
    tokens: list                     # token ids of every prompt used (for shortlist frequencies)
    prompts: int
    positions: list = field(default_factory=list)   # per prompt: the positions its rows hold

    def runs(self) -> list[tuple[int, int]]:
        """(first row, rows) of each prompt's consecutive positions."""
        out, row = [], 0
        for pos in self.positions:
            out.append((row, len(pos)))
            row += len(pos)
        return out


def collect_states(bb, rows: list[dict], layers: list[int], max_tokens: int, per_prompt: int = 64,
                   desc: str = "states") -> States:
    """Hidden states after each of `layers` blocks (and after all) at up to `per_prompt` evenly
    spaced positions of each prompt (one segmented forward per prompt, no head)."""
    from agp.oracle.probes import hidden_at
    from agp.backbone.lens import probe_positions
    want = sorted(set(layers) | {bb.n_layers})
    parts, toks, where = {l: [] for l in want}, [], []
    for r in tqdm(rows, desc=desc, unit="prompt"):
        ids = bb.encode(r["text"], max_tokens=max_tokens, truncate=True)
        if len(ids) < 3:
            continue
        toks.append(ids)
        where.append(probe_positions(len(ids), per_prompt))
        h = hidden_at(bb, ids, want, where[-1])
        for l in want:
            parts[l].append(h[l])
    if not toks:
        raise AGPError("no lane prompt had 3 or more tokens; the lanes are empty")
    return States({l: np.concatenate(v) for l, v in parts.items()}, toks, len(toks), where)


# --- exit-head sweep -------------------------------------------------------------------------------
@dataclass
class ExitSweep:
    rows: list                       # one dict per (layer, vocab): identity / ridge / distilled metrics, costs
    heads: dict                      # (layer, vocab) -> distilled ExitHead
    full_head_ms: float
    top1: np.ndarray                 # the full-depth greedy token at each valid position


def sweep_exits(bb, train: States, valid: States, cfg: RuntimeArgs) -> ExitSweep:
    from agp.heads.exit import full_top1, shortlist
    L = bb.n_layers
    top1 = full_top1(bb, valid.hidden[L])
    eos = sorted(getattr(bb.tokenizer, "eos_token_ids", None) or [])
    one = mx.array(valid.hidden[L][:1])
    full_ms = time_ms(lambda: bb.head(one))
    rows, heads = [], {}
    grid = [(cfg.vocab, E) for E in cfg.exit_layers]
    grid += [(v, E) for v in cfg.vocabs for E in (cfg.vocab_layers or cfg.exit_layers) if v != cfg.vocab]
    bar = tqdm(total=len(cfg.exit_layers) * cfg.head_steps, desc="exit heads", unit="step")
    lists, ridge = {}, {}
    for v, E in grid:
        ids = lists.setdefault(v, shortlist(train.tokens, bb.vocab_size, min(v, bb.vocab_size), always=eos))
        row, head = sweep_one(bb, E, ids, train, valid, top1, cfg, bar, distil=(v == cfg.vocab), ridge=ridge)
        row["full_head_ms"] = full_ms
        rows.append(row)
        heads[(E, len(ids))] = head
    bar.close()
    return ExitSweep(rows, heads, full_ms, top1)


def sweep_one(bb, E: int, ids, train: States, valid: States, top1, cfg: RuntimeArgs, bar, distil: bool = True,
              ridge: dict | None = None):
    """Identity, ridge-initialised and (when `distil`) distilled exit head at layer E over shortlist
    `ids`. The head kept is the better of ridge and distilled by valid top-1 agreement: measured,
    150 distillation steps on ~6K positions lowered layer 15 from 0.66 (ridge) to 0.52."""
    from agp.heads.exit import ExitHead, ExitHeadArgs, distill, evaluate, ridge_start
    L = bb.n_layers
    xe, xl, ve, vl = train.hidden[E], train.hidden[L], valid.hidden[E], valid.hidden[L]
    head = ExitHead.identity(bb, E, ids)
    row = {"layer": E, "vocab": len(ids), "identity": evaluate(head, ve, vl, top1)}
    ridge = {} if ridge is None else ridge          # the translator does not depend on V: fit once per E
    if E not in ridge:
        ridge_start(head, xe, xl)
        ridge[E] = (head.params.W, head.params.b)
    head.params.W, head.params.b = ridge[E]
    row["ridge"] = evaluate(head, ve, vl, top1)
    row["kept"] = "ridge"
    if distil:
        start = {k: mx.array(v) for k, v in tree_flatten(head.params.parameters())}
        ha = ExitHeadArgs(layer=E, vocab=len(ids), steps=cfg.head_steps, batch=cfg.head_batch, lr=cfg.head_lr,
                          seed=cfg.seed)
        row["train"] = distill(head, xe, xl, ha, progress=bar)
        row["distilled"] = evaluate(head, ve, vl, top1)
        if row["distilled"]["top1_agree"] >= row["ridge"]["top1_agree"]:
            row["kept"] = "distilled"
        else:
            head.params.load_weights(list(start.items()))
    row["final"] = row.get("distilled") if row["kept"] == "distilled" else row["ridge"]
    from agp.heads.exit import confidence_curve
    row["confidence_curve"] = confidence_curve(head, ve, top1, TAUS)
    x1 = mx.array(ve[:1])
    row["exit_head_ms"] = time_ms(lambda: head.logits(x1))
    row["exit_head_macs"] = head.macs()
    row["full_head_macs"] = bb.head_macs()
    return row, head


# --- feature draft head ------------------------------------------------------------------------------
def train_feature_draft(bb, rows: dict, train: States, valid: States, sweep: ExitSweep, cfg: RuntimeArgs):
    """The EAGLE-style feature draft head over the saved shortlist, trained on the final states of
    the train prompts plus `draft_prompts` more (final layer only), measured on the valid prompts."""
    if not cfg.feature_draft or bb.arch != "gemma3_text":
        return None
    L = bb.n_layers
    more = pick(rows["train"], cfg.prompts + cfg.draft_prompts)[cfg.prompts:]
    extra = collect_states(bb, more, [], cfg.max_tokens, cfg.max_tokens, "draft states") if more else None
    parts = [train] + ([extra] if extra else [])
    finals = np.concatenate([x.hidden[L] for x in parts])
    ids = next(h.ids_np for (E, V), h in sweep.heads.items() if V == min(cfg.vocab, bb.vocab_size))
    bar = tqdm(total=cfg.draft_steps, desc="feature draft head", unit="step")
    fit = fit_feature_draft(bb, finals, [t for x in parts for t in x.tokens], [p for x in parts for p in x.positions],
                            valid, ids, cfg, bar)
    bar.close()
    return fit


# --- choose and save -------------------------------------------------------------------------------
@dataclass
class Choice:
    kind: str                        # the draft `speculative` uses: "exit" or "feature"
    draft_layer: int                 # the best exit head's layer (speculative:exit, entropy)
    vocab: int
    draft_min_confidence: float
    draft_max: int
    expected_speedup: float
    per_kind: dict                   # kind -> the best row of that draft
    table: list


def choose_draft(bb, sweep: ExitSweep, costs, cfg: RuntimeArgs, valid: States, feature=None) -> Choice:
    """The draft (exit head at E, or the feature head), confidence gate and draft length the cost
    model favours, from chains of drafts measured on the valid prompts."""
    full = costs.full_token(cfg.max_tokens).reads
    V = min(cfg.vocab, bb.vocab_size)
    table = []
    for r in (r for r in sweep.rows if r["vocab"] == V):
        head = sweep.heads[(r["layer"], r["vocab"])]
        conf, ok = exit_chains(head, valid.hidden[r["layer"]], sweep.top1, valid.runs(), cfg.draft_max)
        cost = (costs.layers(0, r["layer"], cfg.max_tokens).reads + head.macs()) / full + VERIFY_POSITION_COST
        table += chain_table(conf, ok, cost, TAUS, cfg.draft_max, kind="exit", layer=r["layer"], vocab=V)
    if feature is not None:
        cost = feature.head.macs() / full + VERIFY_POSITION_COST
        table += chain_table(feature.conf, feature.ok, cost, TAUS, cfg.draft_max, kind="feature", layer=None,
                             vocab=len(feature.head.ids_np))
    per_kind = {}
    for t in table:
        if t["expected_speedup"] > per_kind.get(t["kind"], {}).get("expected_speedup", 0):
            per_kind[t["kind"]] = t
    best = max(per_kind.values(), key=lambda t: t["expected_speedup"])
    return Choice(best["kind"], per_kind["exit"]["layer"], V, best["tau"], best["k"], best["expected_speedup"],
                  per_kind, table)


def save_heads(out: Path, bb, sweep: ExitSweep, choice: Choice, adapter: str | None, cfg: RuntimeArgs,
               model: str | None = None, feature=None) -> dict:
    """One head per exit layer (at the chosen V), the feature draft head, and runtime.json naming
    the draft `speculative` uses, each draft's gate and length, and the backbone."""
    saved = {}
    for (E, V), head in sweep.heads.items():
        if V != choice.vocab:
            continue
        row = next(r for r in sweep.rows if r["layer"] == E and r["vocab"] == V)
        head.save(out / "exit_heads" / f"L{E}", {"model_fingerprint": bb.fingerprint, "valid": row["final"],
                                                 "kept": row["kept"]})
        saved[E] = str(out / "exit_heads" / f"L{E}")
    if feature is not None:
        feature.head.save(out / "draft_head", {"model_fingerprint": bb.fingerprint, "valid": feature.row["valid"]})
    drafts = {k: {"draft_max": r["k"], "draft_min_confidence": r["tau"], "expected_speedup": r["expected_speedup"],
                  "layer": r["layer"]} for k, r in choice.per_kind.items()}
    meta = {"model_fingerprint": bb.fingerprint, "model": model, "adapter_dir": adapter, "exit_layers": sorted(saved),
            "draft_layer": choice.draft_layer, "vocab": choice.vocab, "late_boundary": [cfg.late_boundary],
            "draft_kind": choice.kind, "drafts": drafts, "feature_draft": "draft_head" if feature is not None else None,
            "draft_max": choice.draft_max, "draft_min_confidence": choice.draft_min_confidence}
    io.write_json(out / "runtime.json", meta)
    return meta


# --- benchmark ------------------------------------------------------------------------------------
@dataclass
class Bench:
    prompts: list                    # [{"name", "tokens"}]
    runs: list                       # one dict per (mode, prompt)
    table: list                      # one dict per mode: aggregates and ratios vs the anchor
    profile: dict
    energy: dict = field(default_factory=dict)   # the meter every run used: source, unit, is_proxy, notes


def bench_prompts(bb, rows: dict, cfg: RuntimeArgs) -> list[tuple[str, list[int]]]:
    """Held-out routing-lane prompts (cut to 96 tokens) and one long prompt past the 512-token window."""
    held = [r for r in rows["heldout"] if r["lane"] == "routing"] or rows["heldout"]
    held = pick(held, len(held))
    out = [(f"heldout-{i}", bb.encode(r["text"], max_tokens=96, truncate=True)) for i, r in enumerate(held[:cfg.bench_prompts])]
    out.append((f"long-{cfg.long_prompt_tokens}", long_prompt(bb, held, cfg.long_prompt_tokens)))
    return out


def long_prompt(bb, rows: list[dict], n: int) -> list[int]:
    """n token ids past the 512-token window: the rows' texts one after another (one BOS)."""
    ids = []
    for r in rows:
        ids += bb.encode(r["text"], max_tokens=n, truncate=True)[(1 if ids else 0):]
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise AGPError(f"the held-out lanes hold only {len(ids)} tokens; the long prompt needs {n}")
    return ids[:n]


def lossy_modes(heads, cfg: RuntimeArgs) -> list[tuple[str, dict]]:
    """exit:L at every head, then entropy and routed along their sweeps under each skipped-KV strategy."""
    modes = [(f"exit:{E}", {}) for E in sorted(heads.exits)]
    for kv in cfg.skipped_kv:
        modes += [("entropy", {"entropy_threshold": t, "skipped_kv": kv}) for t in cfg.entropy_thresholds]
        if heads.controller is not None:
            modes.append(("routed", {"skipped_kv": kv}))
            modes += [("routed", {"routed_gate": g, "skipped_kv": kv}) for g in cfg.routed_gates]
    return modes


def benchmark(bb, heads, prompts, cfg: RuntimeArgs, energy="auto") -> Bench:
    """Every mode on every prompt (lossy modes on the first cfg.lossy_prompts), each measured run's
    decode inside one energy window. `energy` is a meter name for agp.energy.meter.choose, or what
    it returned; an unavailable meter leaves energy None and the reason in Bench.energy."""
    from agp.energy.meter import choose
    from agp.runtime.generator import GenerateArgs
    from agp.runtime.measure import agreement, run_anchor, run_mode
    meter, energy_info = choose(energy) if isinstance(energy, str) else energy   # one meter for every run
    n = cfg.bench_new_tokens
    spec_args = dict(draft_max=heads.meta.get("draft_max", cfg.draft_max),
                     draft_min_confidence=heads.meta.get("draft_min_confidence", cfg.draft_min_confidence))
    # the draft the run chose is `speculative`; every other draft the run has is benchmarked too
    others = [(f"speculative:{k}", {"draft_max": d["draft_max"], "draft_min_confidence": d["draft_min_confidence"]})
              for k, d in (heads.meta.get("drafts") or {}).items()
              if k != heads.draft_kind and (k != "feature" or heads.feature is not None)]
    run_anchor(bb, prompts[0][1], 4, "warmup")         # both paths warm before anything is timed
    run_mode(bb, "full", None, prompts[0][1], 4, "warmup")
    runs = []
    lossy = lossy_modes(heads, cfg)
    n_lossy = min(cfg.lossy_prompts, len(prompts) - 1)
    todo = len(prompts) * (3 + len(others)) + n_lossy * len(lossy)
    with tqdm(total=todo, desc="benchmark (modes x prompts)", unit="run") as bar:
        for i, (name, ids) in enumerate(prompts):
            anchor = run_anchor(bb, ids, n, name, meter)
            bar.update(1)
            full = run_mode(bb, "full", None, ids, n, name, meter=meter)
            bar.update(1)
            spec = run_mode(bb, "speculative", heads, ids, n, name, GenerateArgs(**spec_args), meter)
            bar.update(1)
            group = [("mlx_lm.generate", anchor, {}), ("full", full, {}), ("speculative", spec, spec_args)]
            for mode, kw in others:
                group.append((mode, run_mode(bb, mode, heads, ids, n, name, GenerateArgs(**kw), meter), kw))
                bar.update(1)
            if i < n_lossy:
                for mode, kw in lossy:
                    group.append((_label(mode, kw), run_mode(bb, mode, heads, ids, n, name, GenerateArgs(**kw), meter),
                                  kw))
                    bar.update(1)
            for label, r, kw in group:
                runs.append({"mode": label, "prompt": name, "prompt_tokens": r.prompt_tokens, "tokens": r.tokens,
                             "tok_s": r.tok_s, "anchor_tok_s": anchor.tok_s, "step_ms": r.step_ms,
                             "vs_full": agreement(r.tokens, full.tokens),
                             "vs_anchor": agreement(r.tokens, anchor.tokens), "summary": r.summary, "args": kw,
                             "energy": r.energy})
    return Bench([{"name": nm, "tokens": len(ids)} for nm, ids in prompts], runs, summarise(runs),
                 profile_components(bb, heads, prompts[0][1]),
                 energy_info)


def _label(mode: str, kw: dict) -> str:
    kv = "+propagate" if kw.get("skipped_kv") == "propagate" else ""
    if mode == "entropy":
        return f"entropy{kv}@{kw['entropy_threshold']:g}"
    if mode == "routed" and kw.get("routed_gate") is not None:
        return f"routed{kv}@gate{kw['routed_gate']:g}"
    return mode + kv


def summarise(runs: list[dict]) -> list[dict]:
    """Per mode: mean tok/s ratio vs the anchor (and per prompt), ms/token p50/p95, MAC and
    weight-read ratios vs full depth, mean layers, agreement with full depth, acceptance, and the
    energy fields (energy_fields; energy_ratio_vs_full is energy per token over full depth's)."""
    from agp.runtime.measure import percentile
    table = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        rs = [r for r in runs if r["mode"] == mode]
        ms = [x for r in rs for x in r["step_ms"]]
        s = [r["summary"] for r in rs if r["summary"]]
        mean = lambda k: float(np.mean([x[k] for x in s if x.get(k) is not None])) if s and any(x.get(k) is not None for x in s) else None  # noqa: E731
        drafted = sum(x.get("drafted", 0) for x in s)
        table.append({
            "mode": mode, "prompts": [r["prompt"] for r in rs],
            "tok_s_ratio_vs_mlx_lm": float(np.mean([r["tok_s"] / r["anchor_tok_s"] for r in rs])),
            "tok_s_ratio_per_prompt": {r["prompt"]: r["tok_s"] / r["anchor_tok_s"] for r in rs},
            "tok_s": float(np.mean([r["tok_s"] for r in rs])),
            "ms_per_token_p50": percentile(ms, 50), "ms_per_token_p95": percentile(ms, 95),
            "mac_ratio_vs_full": mean("mac_ratio_vs_full") if s else 1.0,
            "read_ratio_vs_full": mean("read_ratio_vs_full") if s else 1.0,
            "mean_layers": mean("mean_layers"),
            "agreement_vs_full": float(np.mean([r["vs_full"]["agreement"] for r in rs])),
            "identical_vs_full": [r["vs_full"]["identical"] for r in rs],
            "identical_vs_mlx_lm": [r["vs_anchor"]["identical"] for r in rs],
            "first_divergence": [r["vs_full"]["first_divergence"] for r in rs],
            "acceptance": (sum(x.get("accepted", 0) for x in s) / drafted) if drafted else None,
            "acceptance_per_prompt": {r["prompt"]: r["summary"].get("acceptance") for r in rs} if drafted else None,
            "tokens_per_round_per_prompt": {r["prompt"]: r["summary"].get("tokens_per_round") for r in rs} if drafted else None,
            "tokens_per_round": mean("tokens_per_round") if drafted else None,
            "actions": {k: sum(x["actions"].get(k, 0) for x in s) for k in sorted({k for x in s for k in x.get("actions", {})})},
            **energy_fields(rs),
        })
    full = next((t for t in table if t["mode"] == "full"), None)
    for t in table:
        ok = full is not None and t["energy_per_token"] is not None and full["energy_per_token"]
        t["energy_ratio_vs_full"] = t["energy_per_token"] / full["energy_per_token"] if ok else None
    return table


def energy_fields(rs: list[dict]) -> dict:
    """One mode's energy over its runs: per emitted token, per accepted token, per routing decision.
    Accepted tokens are the emitted tokens that agree with full depth token for token (the run's
    vs_full agreement x its tokens), so a lossy mode's wrong tokens do not count as work done. A
    routing decision is one controller call: the routed actions (ROUTES) in the run's summary;
    no other mode's summary counts controller decisions (entropy's confidence test is not one),
    so theirs is None."""
    from agp.energy.base import per_unit
    from agp.oracle.labels import ROUTES
    got = [r for r in rs if r.get("energy")]
    if not got:
        return {"energy_source": None, "energy_unit": None, "energy_is_proxy": None, "energy_total": None,
                "energy_per_token": None, "energy_per_accepted_token": None, "energy_per_decision": None}
    e = got[0]["energy"]
    total = {**e, "total": sum(r["energy"]["total"] for r in got)}
    tokens = sum(len(r["tokens"]) for r in got)
    accepted = sum(r["vs_full"]["agreement"] * len(r["tokens"]) for r in got)
    decisions = sum((r["summary"] or {}).get("actions", {}).get(a, 0) for r in got for a in ROUTES)
    u = per_unit(total, tokens, accepted, decisions)
    return {"energy_source": e["source"], "energy_unit": u["unit"], "energy_is_proxy": e["is_proxy"],
            "energy_total": u["total"], "energy_per_token": u["per_token"],
            "energy_per_accepted_token": u["per_accepted_token"], "energy_per_decision": u["per_decision"]}


def profile_components(bb, heads, ids: list[int]) -> dict:
    """Best-of-8 ms of each component of one decode step at this prompt's context: all layers,
    layers [0, E), the full head, the draft exit head, the controller; Python overhead is what a
    measured `full` step costs beyond its layers and head."""
    from agp.runtime.cache import make_rollback_cache, rollback
    from agp.runtime.full import prefill
    cache = make_rollback_cache(bb.model, slack=16)
    prefill(bb, ids[:-1], cache)
    L = bb.n_layers
    E = heads.draft_layer

    def step(a, b):
        p = bb.start(mx.array([[ids[-1]]]), cache)
        h = p.run(p.h0, a, b) if a == 0 else p.h0
        rollback(cache, 1, range(a, b))
        return h

    h = bb.start(mx.array([[ids[-1]]])).h0
    out = {"layers_all_ms": time_ms(lambda: step(0, L)), f"layers_0_{E}_ms": time_ms(lambda: step(0, E)),
           "full_head_ms": time_ms(lambda: bb.head(h)), "exit_head_ms": time_ms(lambda: heads.draft.logits(h))}
    if heads.feature is not None:
        out["feature_draft_ms"] = time_ms(lambda: heads.feature.step(h, ids[-1])[1])
    if heads.controller is not None:
        from agp.heads.controller import route_decisions
        ctl, cal = heads.controller
        x = np.zeros((1, ctl.n_in), np.float32)
        t = time.perf_counter()
        for _ in range(8):
            route_decisions(ctl, cal, x)
        out["controller_ms"] = (time.perf_counter() - t) / 8 * 1e3
    from agp.runtime.measure import run_mode
    r = run_mode(bb, "full", None, ids, 8, "profile")
    # best step, like the components (a median would mix in the other sessions' load)
    out["full_step_ms_measured"] = float(np.min(r.step_ms[1:])) if len(r.step_ms) > 1 else None
    if out["full_step_ms_measured"]:
        out["python_overhead_ms"] = out["full_step_ms_measured"] - out["layers_all_ms"] - out["full_head_ms"]
    return out


# --- teacher-forced frontier ----------------------------------------------------------------------
@dataclass
class Frontier:
    points: list                     # {"method", "param", "top1", "mac_ratio"} on held-out positions
    positions: int


def teacher_forced_frontier(bb, heads, states: States, costs, cfg: RuntimeArgs) -> Frontier:
    """Next-token top-1 agreement with full depth vs MACs on held-out text positions (teacher
    forced: every position sees the true prefix), for exit:L, entropy along a threshold sweep and
    routed along an abstain-gate sweep. MACs follow the runtime's accounting: exit:L stops at L;
    entropy and routed pay every layer (catch-up) and save on the head."""
    from agp.heads.exit import full_top1, shortlist_top1
    L, ctx = bb.n_layers, cfg.max_tokens
    top1 = full_top1(bb, states.hidden[L])
    full = costs.full_token(ctx).macs
    layers_all = costs.layers(0, L, ctx).macs
    exit_tok, exit_p1 = {}, {}
    for E, head in heads.exits.items():
        exit_p1[E], exit_tok[E] = shortlist_top1(head, states.hidden[E])
    pts = [{"method": "full", "param": None, "top1": 1.0, "mac_ratio": 1.0}]
    for E, head in sorted(heads.exits.items()):
        pts.append({"method": "exit:L", "param": E, "top1": float((exit_tok[E] == top1).mean()),
                    "mac_ratio": (costs.layers(0, E, ctx).macs + head.macs()) / full})
    E = heads.draft_layer
    for t in sorted(set(TAUS) | set(cfg.entropy_thresholds) | {0.95, 0.99}):
        ex = exit_p1[E] >= t
        tok = np.where(ex, exit_tok[E], top1)
        macs = layers_all + np.where(ex, heads.exits[E].macs(), costs.head_macs)
        pts.append({"method": "entropy", "param": float(t), "top1": float((tok == top1).mean()),
                    "mac_ratio": float(macs.mean() / full)})
    if heads.controller is not None:
        pts += routed_points(heads, states, top1, exit_tok, layers_all, full, costs)
    return Frontier(pts, int(len(top1)))


def routed_points(heads, states: States, top1, exit_tok, layers_all, full, costs) -> list[dict]:
    from agp.calibrate.policy import ACC, CONT
    from agp.heads.controller import route_decisions
    ctl, cal = heads.controller
    D, B = int(cal["decision_layer"]), int(heads.meta.get("late_boundary", [costs.n - 3])[0])
    feats = np.concatenate([states.hidden[r] for r in cal["read_layers"]], axis=1)
    dec = route_decisions(ctl, cal, feats)
    out = []
    for g in sorted({float(cal["abstain_gate"])} | {round(x, 2) for x in np.linspace(0, 1, 11)}):
        act = np.where(dec["confidence"] < g, -1, dec["action"])
        tok = np.where(act == ACC, exit_tok[D], np.where(act == CONT, exit_tok[B], top1))
        head = np.where(act == ACC, heads.exits[D].macs(), np.where(act == CONT, heads.exits[B].macs(), costs.head_macs))
        out.append({"method": "routed", "param": g, "calibrated": g == float(cal["abstain_gate"]),
                    "top1": float((tok == top1).mean()),
                    "mac_ratio": float((layers_all + head + ctl.macs()).mean() / full)})
    return out


# --- the stage ------------------------------------------------------------------------------------
def run(run, args) -> dict:
    """Exit heads, then every mode on the same prompts; writes <run>/runtime/."""
    from agp.report.runtime import write_report
    from agp.runtime import heads as H
    from agp.runtime.cost import CostModel
    t0 = time.perf_counter()
    cfg = config.for_stage(RuntimeArgs, NAME, args)
    out = run.stage_dir(NAME)
    src = source(run, getattr(args, "model", None))
    bb = src.bb
    if any(not 0 < E < bb.n_layers for E in cfg.exit_layers):
        raise AGPError(f"--runtime-exit-layers must lie in 1..{bb.n_layers - 1}, got {cfg.exit_layers}")
    cfg.exit_layers, cfg.late_boundary = routed_layers(run, bb.n_layers, cfg)
    timings = {"load_s": time.perf_counter() - t0}
    t = time.perf_counter()
    train = collect_states(bb, pick(src.rows["train"], cfg.prompts), cfg.exit_layers, cfg.max_tokens,
                           cfg.max_tokens, "train states")
    valid = collect_states(bb, pick(src.rows["valid"], max(cfg.prompts // 4, 2)), cfg.exit_layers, cfg.max_tokens,
                           cfg.max_tokens, "valid states")
    timings["states_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sweep = sweep_exits(bb, train, valid, cfg)
    timings["exit_heads_s"] = time.perf_counter() - t
    t = time.perf_counter()
    feature = train_feature_draft(bb, src.rows, train, valid, sweep, cfg)
    timings["feature_draft_s"] = time.perf_counter() - t
    costs = CostModel(bb)
    choice = choose_draft(bb, sweep, costs, cfg, valid, feature)
    meta = save_heads(out, bb, sweep, choice, src.adapter_dir, cfg, getattr(args, "model", None), feature)
    # the benchmark loads the heads from disk exactly as `agp generate` does
    heads = H.load(run, bb, "routed" if run.stage("controller").get("status") == "done" else "speculative",
                   finished=False)
    held = collect_states(bb, pick(src.rows["heldout"], max(cfg.prompts // 4, 2)), sorted(heads.exits), cfg.max_tokens,
                          cfg.max_tokens, "held-out states")
    frontier = teacher_forced_frontier(bb, heads, held, costs, cfg)
    t = time.perf_counter()
    bench = benchmark(bb, heads, bench_prompts(bb, src.rows, cfg), cfg)
    timings["benchmark_s"] = time.perf_counter() - t
    io.write_json(out / "bench.json", {"runs": bench.runs, "table": bench.table, "energy": bench.energy})
    io.write_json(out / "sweep.json", {"rows": sweep.rows, "choice_table": choice.table})
    metrics = {"config": cfg.to_dict(), "backbone": "adapter" if src.adapter_dir else "base",
               "adapter_dir": src.adapter_dir, "model_fingerprint": bb.fingerprint, "runtime": meta,
               "sweep": sweep.rows, "feature_draft": feature.row if feature is not None else None,
               "choice": {"kind": choice.kind, "per_kind": choice.per_kind,
                          "draft_layer": choice.draft_layer, "vocab": choice.vocab,
                                               "draft_min_confidence": choice.draft_min_confidence,
                                               "draft_max": choice.draft_max,
                                               "expected_speedup": choice.expected_speedup},
               "bench": {"prompts": bench.prompts, "table": bench.table, "profile": bench.profile,
                         "energy": bench.energy},
               "teacher_forced": {"positions": frontier.positions, "points": frontier.points},
               "states": {"train_positions": int(len(train.hidden[bb.n_layers])),
                          "valid_positions": int(len(valid.hidden[bb.n_layers])),
                          "train_prompts": train.prompts, "valid_prompts": valid.prompts},
               "timings": timings, "headline": headline(bench.table)}
    write_report(out, metrics)
    timings["total_s"] = time.perf_counter() - t0
    run.update_stage(NAME, artifacts={"runtime_json": run.relative(out / "runtime.json"),
                                      "bench": run.relative(out / "bench.json")})
    return io.json_safe(metrics)


def headline(table: list[dict]) -> dict:
    """The speculative row's figures for the end-of-run table."""
    row = next((r for r in table if r["mode"] == "speculative"), None)
    if row is None:
        return {}
    return {"speculative_tok_s_ratio": row["tok_s_ratio_vs_mlx_lm"], "speculative_acceptance": row["acceptance"],
            "speculative_identical": all(row["identical_vs_full"])}


CONFIG = RuntimeArgs  # the dataclass `agp run` makes this stage's flags and --config section from
