"""`Generator`: greedy generation in one of the runtime modes, yielding one `Event` per token.

    gen = Generator(bb, "speculative", heads)
    for ev in gen.generate("def fibonacci(n):"):
        print(ev.text, end="")
    print(gen.summary.line())
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from agp.config import ConfigMixin
from agp.errors import AGPError
from agp.runtime.cost import CostModel
from agp.runtime.events import Event, Summary

MODES = ("full", "speculative", "speculative:exit", "speculative:feature", "exit:L", "entropy", "routed")


@dataclass
class GenerateArgs(ConfigMixin):
    max_new_tokens: int = 64
    draft_max: int = 4              # speculative: most tokens drafted per round
    draft_min_confidence: float = 0.3   # speculative: stop drafting below this shortlist top-1 probability
    entropy_threshold: float = 0.9  # entropy mode: exit when the exit head's top-1 probability is at least this
    routed_gate: float | None = None  # routed: abstain (escalate) below this confidence; None = calibrated gate
    # entropy/routed: the KV of layers an exited token skipped. "catchup" runs the exited state
    # through them later, batched with the next deeper token (exact for that state, pays the layer
    # MACs); "propagate" fills only their K/V from the exited state at once (CALM: saves the MACs,
    # approximate KV).
    skipped_kv: str = "catchup"
    stop_at_eos: bool = True
    mode: str = "full"             # set by Generator


def decoder_class(mode: str):
    """The decoder implementing `mode` (`exit:L` carries its layer)."""
    from agp.runtime.full import FullDecoder
    if mode == "full":
        return FullDecoder
    if mode == "speculative" or mode.startswith("speculative:"):
        from agp.runtime.speculative import SpeculativeDecoder
        return SpeculativeDecoder
    if mode.startswith("exit:") or mode in ("entropy", "routed"):
        from agp.runtime.early import EarlyExitDecoder
        return EarlyExitDecoder
    raise AGPError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")


class Generator:
    """Greedy generation from `bb` in `mode`, with the heads a mode needs (`agp.runtime.heads`).
    `decoder(bb, costs, heads, args)` replaces the mode's single-host decoder class."""

    def __init__(self, bb, mode: str = "full", heads=None, args: GenerateArgs | None = None, decoder=None):
        self.bb, self.mode, self.heads = bb, mode, heads
        self.args = args or GenerateArgs()
        if self.args.max_new_tokens <= 0:
            raise AGPError(f"--max-new-tokens must be at least 1, got {self.args.max_new_tokens}")
        self.costs = CostModel(bb)
        cls = decoder or decoder_class(mode)   # `decoder`: another host layout (agp.serve.remote)
        self.args.mode = mode
        self.decoder = cls(bb, self.costs, heads, self.args)
        self.mode = getattr(self.decoder, "name", mode)
        self.summary = Summary(mode=self.mode, n_layers=bb.n_layers)
        self.on_prefilled = None     # called once prefill is done, before decode time starts (energy windows)

    def encode(self, prompt) -> list[int]:
        limit = self.bb.config.get("max_position_embeddings", 32768)
        ids = list(prompt) if isinstance(prompt, (list, tuple)) else self.bb.encode(prompt, max_tokens=limit)
        if not ids:
            raise AGPError("empty prompt; give at least one token")
        if len(ids) + self.args.max_new_tokens > limit:
            raise AGPError(f"prompt of {len(ids)} tokens plus {self.args.max_new_tokens} new tokens is over the "
                           f"model's context of {limit}; shorten the prompt or lower --max-new-tokens")
        return ids

    def generate(self, prompt) -> Iterator[Event]:
        """Yield one Event per emitted token; `self.summary` is up to date after each."""
        ids = self.encode(prompt)
        s = self.summary = Summary(mode=self.mode, prompt_tokens=len(ids), n_layers=self.bb.n_layers)
        t0 = time.perf_counter()
        self.decoder.start(ids)
        s.prefill_s = time.perf_counter() - t0
        detok = self.bb.tokenizer.detokenizer
        detok.reset()
        eos = set(getattr(self.bb.tokenizer, "eos_token_ids", None) or [])
        if self.on_prefilled is not None:
            self.on_prefilled()
        position, t1, done = len(ids), time.perf_counter(), False
        while not done and s.tokens < self.args.max_new_tokens:
            r = self.decoder.round(self.args.max_new_tokens - s.tokens)
            s.decode_s = time.perf_counter() - t1
            s.rounds += 1
            s.drafted += r.drafted
            s.accepted += r.accepted
            k = len(r.tokens)
            for tok, action, layers in zip(r.tokens, r.actions, r.layers):
                if (self.args.stop_at_eos and tok in eos) or s.tokens >= self.args.max_new_tokens:
                    done = True   # like mlx-lm: the EOS token ends generation and is not emitted
                    break
                detok.add_token(tok)
                ev = Event(tok, detok.last_segment, action, layers, r.cost.macs // k, r.cost.reads // k, position,
                           s.rounds)
                full = self.costs.full_token(position)
                s.add(ev, full.macs, full.reads)
                position += 1
                yield ev
        detok.finalize()
        s.decode_s = time.perf_counter() - t1
