"""Move a boundary state to a second host and resume the model there (stage 5, transfer).

The split at boundary b: the sender owns layers [0, b) and its own KV cache; for each new span of
positions it computes their states after b blocks. The wire carries a span's states encoded with
one codec, framed as an AGP-PTP packet (identity + payload, docs/ptp.md) and accepted by a
`Receiver` (fingerprints, codec, replay window). The resumer owns layers [b, L) and the head with
*its own* KV cache, built only from the transferred states of every span it accepted — so codec
error compounds through its KV exactly as it would across hosts, instead of being measured on
one position against a clean cache.

Attention-sink states travel exactly. Gemma 3 has a few positions whose state is huge: the BOS
position (|h| ~ 1e5 at blocks 12-15) and, in long text, some later ones (9.2e4 measured at a
position ~230 of a 640-token span), beyond fp16's 65 504 and far from every other state. A codec
that mangles them harms every later position through the KV. `Wire.packets` therefore cuts a
span into runs: positions whose largest |h| exceeds SINK_LIMIT go in f32 packets, the rest with
the codec under test. Their bytes are reported apart: a session has a handful of them.

A session is a sequence of spans. The resumer refuses, with a typed error and before touching its
cache, a span that does not start where the previous one ended (a gap, a duplicate, out of
order), a state for another boundary layer, and anything the Receiver refuses (another model or
tokenizer, an unknown codec, a replayed sequence number).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from agp.ptp.errors import PTPError
from agp.quant.registry import make_codec

SENDER, RESUMER = "agp-sender", "agp-resumer"
# Half of fp16's range: Gemma's ordinary states stay under ~2.7e4 at every block, its sinks reach ~1e5.
SINK_LIMIT = 32768.0


class SpanGap(PTPError):
    """A span that does not continue the session (gap, duplicate or out of order)."""
    reason = "span"


class WrongBoundary(PTPError):
    """A state for another boundary layer than the resumer's."""
    reason = "layer"


class WrongAdapter(PTPError):
    """A residual whose width is neither the model's nor the resumer's transfer adapter code width."""
    reason = "adapter"


def backbone_quantization(bb) -> str:
    """The identity section's backbone quantization: mlx-q4/mlx-q8 for mlx-quantized weights,
    q4_k_m for the embedded GGUF conversion, else the float type the weights are stored in."""
    from agp.backbone import embedded
    q = bb.config.get("quantization")
    if isinstance(q, dict) and q.get("bits") in (4, 8):
        return f"mlx-q{q['bits']}"
    if Path(bb.path).name.startswith(embedded.NAME):
        return "q4_k_m"
    return {"float16": "f16", "bfloat16": "bf16"}.get(bb.config.get("torch_dtype"), "f32")


@dataclass
class Wire:
    """One codec on the wire between a sender and a resumer at boundary `layer`; with a learned
    transfer `adapter` (agp.transfer.adapter) the codec carries its code instead of the state."""
    bb: object
    layer: int
    codec: str
    session: int = 1
    seed: int = 0
    adapter: object = None

    def __post_init__(self):
        width = self.adapter.width if self.adapter is not None else self.bb.hidden_size
        self._codecs = {"f32": make_codec("f32"), self.codec: make_codec(self.codec, width, self.seed)}
        self._seq = 0

    def packet(self, states: np.ndarray, start: int, exact: bool = False) -> bytes:
        """The AGP-PTP packet carrying the states [n, H] of positions start .. start + n - 1
        (with the f32 codec when `exact`: attention-sink positions)."""
        from agp.ptp.packet import encode_packet
        from agp.ptp.sections import Identity, Packet, Payload
        self._seq += 1
        idn = Identity(self.bb.fingerprint, self.bb.tokenizer_fingerprint, backbone_quantization(self.bb),
                       self.session, start, len(states), self.layer, self._seq, SENDER, RESUMER)
        states = np.asarray(states, np.float32)
        if not exact and self.adapter is not None:
            states = self.adapter.encode(states)
        blob = self._codecs["f32" if exact else self.codec].encode(states)
        return encode_packet(Packet(idn, Payload(blob)))

    def packets(self, states: np.ndarray, start: int) -> list[tuple[bytes, bool]]:
        """The span as consecutive runs, (packet, exact): attention-sink positions (largest |h| >
        SINK_LIMIT) in f32, every other run with the codec."""
        sink = np.abs(states).max(axis=1) > SINK_LIMIT
        cuts = [0] + [i for i in range(1, len(states)) if sink[i] != sink[i - 1]] + [len(states)]
        return [(self.packet(states[a:b], start + a, exact=bool(sink[a])), bool(sink[a]))
                for a, b in zip(cuts, cuts[1:])]


def receiver_for(bb, loopback: bool = False, adapter=None):
    """The Receiver a resuming host runs for this backbone (accepting `adapter`'s codes too)."""
    from agp.ptp.receiver import Receiver
    return Receiver(bb.fingerprint, bb.tokenizer_fingerprint, backbone_quantization(bb), RESUMER,
                    hidden_size=bb.hidden_size, loopback=loopback,
                    code_widths=(adapter.width,) if adapter is not None else ())


class Sender:
    """Layers [0, b) with the sender's own cache: the states after b blocks of each new span."""

    def __init__(self, bb, layer: int):
        self.bb, self.layer, self.cache = bb, int(layer), bb.make_cache()

    def states(self, ids) -> np.ndarray:
        _, _, _, got = self.bb.states(mx.array([list(ids)]), [self.layer], self.cache, "transfer boundary")
        h = got[self.layer][0].astype(mx.float32)
        mx.eval(h)
        return np.asarray(h)


class Resumer:
    """Layers [b, L) and the head with the resuming host's own cache, fed only by packets."""

    def __init__(self, bb, layer: int, receiver, cache=None, adapter=None):
        self.bb, self.layer, self.receiver, self.adapter = bb, int(layer), receiver, adapter
        self.cache, self.next = (bb.make_cache() if cache is None else cache), 0
        self.dtype = bb.model.model.embed_tokens.weight.dtype
        self.out = None        # the final states [1, n, H] (before the norm) of the last accepted spans

    def accept(self, *packets, tail: int | None = None, head: bool = True) -> tuple[mx.array | None, np.ndarray]:
        """One step of the resuming host: the packets' spans, which must follow each other and the
        session, run through layers [b, L) in one pass (as the sender ran them, so an exact codec
        resumes to bitwise-identical logits). A packet is bytes (received and checked here) or a
        Packet its caller already received. Returns (logits [tail, V] after the last `tail`
        positions, all by default, or None without `head`; the received states [n, H])."""
        from agp.ptp.sections import Packet
        received, at = [], self.next
        for data in packets:
            p = data if isinstance(data, Packet) else self.receiver.receive(data)
            idn = p.identity
            if idn.layer != self.layer:
                raise WrongBoundary(f"state after block {idn.layer}, this resumer continues from block {self.layer}",
                                    "identity")
            if idn.span_start != at:
                raise SpanGap(f"span starts at position {idn.span_start}, this session continues at {at} "
                              f"({'a gap' if idn.span_start > at else 'a duplicate or out of order'})", "identity")
            received.append(self.state(p))
            at += idn.span_len
        h = np.concatenate(received)
        out = self.bb.run_layers(mx.array(h)[None].astype(self.dtype), self.layer, self.bb.n_layers, self.cache)
        logits = self.bb.head(out[:, -tail:] if tail else out)[0] if head else None
        mx.eval(out if logits is None else [out, logits])
        self.next, self.out = at, out
        return logits, h

    def state(self, p) -> np.ndarray:
        """The packet's states [n, H]: the residual itself, or decoded from the transfer adapter's code."""
        r = self.receiver.state(p)
        if r.shape[1] == self.bb.hidden_size:
            return r
        if self.adapter is None or r.shape[1] != self.adapter.width:
            have = f"an adapter of width {self.adapter.width}" if self.adapter is not None else "no transfer adapter"
            raise WrongAdapter(f"residual width {r.shape[1]} is a transfer adapter code, this resumer has {have}",
                               "payload")
        return self.adapter.decode(r)
