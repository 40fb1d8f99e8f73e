"""The receiving end: compatibility checks and the replay window (docs/ptp.md §3)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from dataclasses import dataclass, field

from agp.ptp.errors import (CenterMismatch, CodecVersionMismatch, FingerprintMismatch, HostMismatch, LoopbackMismatch,
                            MalformedSection, ReplayRejected, UnknownCodec)
from agp.ptp.packet import decode_packet
from agp.ptp.sections import Packet, fingerprint8, host_id
from agp.quant import registry
from agp.quant.turboquant import center_id

DEFAULT_CODECS = {name: (version,) for name, version in registry.versions().items()}


class ReplayWindow:
    """Per-session sliding window of seen sequence numbers (RFC 4303 anti-replay), bounded in memory."""

    def __init__(self, window: int = 1024, max_sessions: int = 4096):
        if window < 1 or max_sessions < 1:
            raise ValueError("window and max_sessions must be positive")
        self.window, self.max_sessions = window, max_sessions
        self._sessions: OrderedDict[int, list[int]] = OrderedDict()  # session -> [highest, bitmap]
        self._retired: OrderedDict[int, None] = OrderedDict()  # evicted sessions: reject their packets

    def check(self, session: int, seq: int, commit: bool = True) -> None:
        """Raise ReplayRejected for a duplicate or stale (session, seq); record it when `commit`."""
        if session in self._retired:
            raise ReplayRejected(f"session {session:#x} was evicted from the replay window; start a new session", "identity")
        st = self._sessions.get(session)
        if st is None:
            if commit:
                self._admit(session, [seq, 1])
            return
        hi, bits = st
        if seq > hi:
            if commit:
                shift = seq - hi
                st[0], st[1] = seq, ((bits << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
                self._sessions.move_to_end(session)
            return
        back = hi - seq
        if back >= self.window:
            raise ReplayRejected(f"stale sequence number {seq} in session {session:#x} (newest {hi}, window {self.window})",
                                 "identity")
        if bits >> back & 1:
            raise ReplayRejected(f"duplicate sequence number {seq} in session {session:#x}", "identity")
        if commit:
            st[1] = bits | (1 << back)
            self._sessions.move_to_end(session)

    def _admit(self, session: int, state: list[int]) -> None:
        self._sessions[session] = state
        while len(self._sessions) > self.max_sessions:
            old, _ = self._sessions.popitem(last=False)
            self._retired[old] = None
            while len(self._retired) > 4 * self.max_sessions:
                self._retired.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass
class Receiver:
    """Accepts packets for one backbone on one host; everything else is rejected with a typed error."""

    model_fp: str | bytes
    tokenizer_fp: str | bytes
    quantization: str
    host: str
    codecs: dict = field(default_factory=lambda: dict(DEFAULT_CODECS))  # name -> accepted versions
    window: int = 1024
    max_sessions: int = 4096
    loopback: bool = False
    hidden_size: int | None = None  # when set, the residual must be [span_len, hidden_size]
    code_widths: tuple = ()         # other residual widths accepted: a learned transfer adapter's codes
    centers: dict | None = None     # layer -> mean vector, for TurboQuant blobs centered on a per-layer mean
    # a dense (Haar) rotation costs an O(d^3) QR for every new seed a sender names: 0.6-3 s for d=640 on this
    # 2-core host, from a 400-byte packet. It is the reference rotation, not a wire format: off unless asked.
    allow_dense: bool = False

    def __post_init__(self):
        self._model, self._tok = fingerprint8(self.model_fp), fingerprint8(self.tokenizer_fp)
        self._host = host_id(self.host)
        self._codecs = {registry.BY_NAME[k].codec_id: set(v) for k, v in self.codecs.items()}
        self.replay = ReplayWindow(self.window, self.max_sessions)
        self._center_ids = {int(k): center_id(v) for k, v in (self.centers or {}).items()}
        self._center_dims = {int(k): int(np.shape(v)[-1]) for k, v in (self.centers or {}).items()}
        self.accepted = 0

    def check(self, p: Packet) -> None:
        """Compatibility checks (step 6) on a decoded packet."""
        idn = p.identity
        if idn.model_fp != self._model:
            raise FingerprintMismatch(f"model fingerprint {idn.model_fp.hex()} != this receiver's {self._model.hex()}", "identity")
        if idn.tokenizer_fp != self._tok:
            raise FingerprintMismatch(f"tokenizer fingerprint {idn.tokenizer_fp.hex()} != this receiver's {self._tok.hex()}", "identity")
        if idn.quantization != self.quantization:
            raise FingerprintMismatch(f"backbone quantization {idn.quantization} != this receiver's {self.quantization}", "identity")
        if p.loopback != self.loopback:
            raise LoopbackMismatch("loopback debug packet sent to a production receiver" if p.loopback
                                   else "production packet sent to a loopback receiver", "header")
        if idn.target_host != self._host or (self.loopback and idn.source_host != self._host):
            raise HostMismatch(f"packet from host id {idn.source_host.hex()} addressed to {idn.target_host.hex()}, "
                               f"this receiver is {self.host} ({self._host.hex()})", "identity")
        for what, meta in (("residual", p.payload.meta), ("kv summary", getattr(p.payload, "kv_meta", None))):
            if meta is None:
                continue
            if meta["codec_id"] not in self._codecs:
                raise UnknownCodec(f"{what} codec {meta['scheme']} is not accepted here", "payload")
            if meta["version"] not in self._codecs[meta["codec_id"]]:
                raise CodecVersionMismatch(f"{what} codec {meta['scheme']} version {meta['version']} not in accepted "
                                           f"{sorted(self._codecs[meta['codec_id']])}", "payload")
            if meta.get("rotation") == "dense" and not self.allow_dense:
                raise UnknownCodec(f"{what} uses a dense TurboQuant rotation, which this receiver does not accept "
                                   "(an O(d^3) build per seed); send hadamard or set allow_dense", "payload")
        shape = p.payload.meta["shape"]
        if len(shape) != 2 or shape[0] != idn.span_len:
            raise MalformedSection(f"residual shape {shape} must be [span_len={idn.span_len}, d]", "payload")
        # a receiver knows its model's width: refusing other widths also keeps a sender from making
        # it build rotations/codebooks for arbitrary sizes
        if self.hidden_size is not None and shape[1] != self.hidden_size and shape[1] not in self.code_widths:
            also = f" or a transfer adapter code width in {sorted(self.code_widths)}" if self.code_widths else ""
            raise FingerprintMismatch(f"residual width {shape[1]} != this model's hidden size {self.hidden_size}{also}",
                                      "payload")

        cid = p.payload.meta.get("center_id")
        if cid is not None and self._center_ids.get(idn.layer) != cid:
            have = self._center_ids.get(idn.layer)
            raise CenterMismatch(f"residual is centered on mean {cid:#06x} for layer {idn.layer}; this receiver has "
                                 f"{'none' if have is None else f'{have:#06x}'} for that layer", "payload")
        if cid is not None and self._center_dims[idn.layer] != shape[1]:
            raise CenterMismatch(f"residual width {shape[1]} != the width {self._center_dims[idn.layer]} of this "
                                 f"receiver's mean for layer {idn.layer}", "payload")

    def state(self, p: Packet) -> np.ndarray:
        """The packet's hidden state [span_len, d] (centered blobs get this receiver's layer mean back)."""
        center = (self.centers or {}).get(p.identity.layer) if p.payload.meta.get("center_id") is not None else None
        return p.payload.array(center)

    def receive(self, data) -> Packet:
        """Decode, check and replay-filter one packet; returns it or raises a PTPError subclass."""
        p = decode_packet(data)
        self.check(p)
        self.replay.check(p.identity.session_id, p.identity.seq)
        self.accepted += 1
        return p
