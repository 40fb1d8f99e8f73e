"""What generation yields (one `Event` per emitted token) and the running `Summary`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Event:
    """One emitted token."""
    token: int
    text: str            # the text piece this token completes (streaming detokenizer)
    action: str          # full | draft_accepted | correction | accept_local | continue_local | escalate | revive_local | exit
    layers: int          # transformer layers this token's own forward ran
    macs: int            # MACs attributed to this token (its round's MACs / tokens emitted in the round)
    reads: int           # weight elements read, attributed the same way
    position: int        # index in the full sequence (prompt included)
    round: int = 0       # which decoder step emitted it (a speculative round emits several)


@dataclass
class Summary:
    """Totals of one generation; complete at every point, so an interrupt can still print it."""
    mode: str
    prompt_tokens: int = 0
    tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    layers: int = 0
    macs: int = 0
    reads: int = 0
    full_macs: int = 0           # what full depth would have cost for the same tokens
    full_reads: int = 0
    actions: dict = field(default_factory=dict)
    rounds: int = 0              # decoder steps (speculative: verify passes)
    drafted: int = 0
    accepted: int = 0
    interrupted: bool = False
    n_layers: int = 0

    def add(self, ev: Event, full_macs: int, full_reads: int) -> None:
        self.tokens += 1
        self.layers += ev.layers
        self.macs += ev.macs
        self.reads += ev.reads
        self.full_macs += full_macs
        self.full_reads += full_reads
        self.actions[ev.action] = self.actions.get(ev.action, 0) + 1

    def to_dict(self) -> dict:
        t = max(self.tokens, 1)
        return {"mode": self.mode, "prompt_tokens": self.prompt_tokens, "tokens": self.tokens,
                "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
                "tok_s": self.tokens / self.decode_s if self.decode_s > 0 else None,
                "mean_layers": self.layers / t, "macs_per_token": self.macs / t,
                "mac_ratio_vs_full": self.macs / self.full_macs if self.full_macs else None,
                "reads_per_token": self.reads / t,
                "read_ratio_vs_full": self.reads / self.full_reads if self.full_reads else None,
                "actions": dict(self.actions), "rounds": self.rounds, "drafted": self.drafted,
                "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else None,
                "mean_accepted_length": self.accepted / self.rounds if self.rounds and self.drafted else None,
                "tokens_per_round": self.tokens / self.rounds if self.rounds else None,
                "interrupted": self.interrupted, "n_layers": self.n_layers}

    def line(self) -> str:
        d = self.to_dict()
        tok_s = f"{d['tok_s']:.2f} tok/s" if d["tok_s"] else "- tok/s"
        mac = f"{d['mac_ratio_vs_full']:.3f}x" if d["mac_ratio_vs_full"] else "-"
        rd = f"{d['read_ratio_vs_full']:.3f}x" if d["read_ratio_vs_full"] else "-"
        acts = ",".join(f"{k}={v}" for k, v in sorted(self.actions.items())) or "-"
        acc = (f"{d['acceptance']:.2f} ({self.accepted}/{self.drafted}, {d['tokens_per_round']:.2f} tokens/round)"
               if d["acceptance"] is not None else "-")
        flag = " [interrupted]" if self.interrupted else ""
        return (f"[{self.mode}] {self.tokens} tokens, {tok_s}, mean layers {d['mean_layers']:.2f}/{self.n_layers}, "
                f"MACs/token {d['macs_per_token'] / 1e6:.1f}M ({mac} full depth), weight reads {rd} full, "
                f"actions {acts}, draft acceptance {acc}{flag}")
