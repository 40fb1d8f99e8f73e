"""Measure runtime modes on the same prompts in one process: speed, cost, parity/agreement.

The anchor is `mlx_lm.generate`'s greedy stream on the same backbone. Every mode decodes the
same prompts; tok/s ratios are taken against the anchor within one run (the machines are
shared, so absolute numbers drift; ratios taken minutes apart are not comparable). With a
`meter` (agp.energy) each measured run's decode is one energy window: it opens where the prefill
of all prompt tokens but the last ends (where decode time starts), because prefill is the same
full-depth pass in every mode and, on a long prompt, would drown the modes' difference.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from agp.runtime.generator import GenerateArgs, Generator


@dataclass
class ModeRun:
    """One mode on one prompt."""
    mode: str
    prompt: str
    prompt_tokens: int
    tokens: list
    decode_s: float
    step_ms: list = field(default_factory=list)      # wall time between consecutive tokens
    summary: dict = field(default_factory=dict)
    energy: dict | None = None                       # decode's agp.energy Reading.to_dict(); None unmetered

    @property
    def tok_s(self) -> float:
        return len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0


class DecodeWindow:
    """An energy window opened once prefill is done and closed after the last token (or on error)."""

    def __init__(self, meter):
        self.meter, self.open = meter, False

    def begin(self) -> None:
        if self.meter is not None and not self.open:
            self.meter.start()
            self.open = True

    def end(self) -> dict | None:
        if not self.open:
            return None
        self.open = False
        return self.meter.stop().to_dict()


def run_anchor(bb, ids: list[int], n: int, name: str, meter=None) -> ModeRun:
    """mlx-lm's own greedy generation (the anchor). Decode time starts where its prefill of all
    prompt tokens but the last ends (its progress callback), as the Generator's does."""
    from mlx_lm.generate import stream_generate
    marks, win = {}, DecodeWindow(meter)

    def progress(done, total):
        if done == total - 1:        # mlx-lm prefills all but the last token, then decodes
            win.begin()              # before the mark: a meter's start-up is not decode time
        if done < total:
            marks["prefilled"] = time.perf_counter()
    toks, stamps = [], []
    t0 = time.perf_counter()
    try:
        for r in stream_generate(bb.model, bb.tokenizer, ids, max_tokens=n, prompt_progress_callback=progress):
            toks.append(r.token)
            stamps.append(time.perf_counter())
    finally:
        energy = win.end()
    start = marks.get("prefilled", t0)
    ms = list(np.diff([start] + stamps) * 1e3)
    return ModeRun("mlx_lm.generate", name, len(ids), toks, stamps[-1] - start if stamps else 0.0, ms,
                   energy=energy)


def run_mode(bb, mode: str, heads, ids: list[int], n: int, name: str, args: GenerateArgs | None = None,
             meter=None) -> ModeRun:
    """One runtime mode; per-token ms spreads each decoder step's time over the tokens it emitted."""
    args = args or GenerateArgs()
    args.max_new_tokens = n
    g = Generator(bb, mode, heads, args)
    win = DecodeWindow(meter)
    g.on_prefilled = win.begin
    toks, rounds, stamps = [], [], []
    try:
        for ev in g.generate(ids):
            toks.append(ev.token)
            rounds.append(ev.round)
            stamps.append(time.perf_counter())
    finally:
        energy = win.end()
    s = g.summary
    start = stamps[-1] - s.decode_s if stamps else 0.0
    ms, prev = [], start
    for r in sorted(set(rounds)):
        idx = [i for i, x in enumerate(rounds) if x == r]
        end = stamps[idx[-1]]
        ms += [(end - prev) * 1e3 / len(idx)] * len(idx)
        prev = end
    return ModeRun(mode, name, len(ids), toks, s.decode_s, ms, s.to_dict(), energy)


def agreement(a: list, ref: list) -> dict:
    """Token agreement with the reference continuation and the first divergence position."""
    n = min(len(a), len(ref))
    first = next((i for i in range(n) if a[i] != ref[i]), None if len(a) == len(ref) else n)
    return {"agreement": float(np.mean([a[i] == ref[i] for i in range(n)])) if n else 1.0,
            "identical": a == ref, "first_divergence": first}


def percentile(xs, q) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None
