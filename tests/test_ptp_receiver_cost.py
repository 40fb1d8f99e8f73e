"""A sender must not be able to make the receiver do expensive work: a dense TurboQuant rotation needs an
O(d^3) QR for every seed the packet names, so receivers refuse it unless configured to accept it."""

import numpy as np
import pytest

from agp.ptp.errors import UnknownCodec
from agp.ptp.packet import encode_packet
from agp.ptp.receiver import Receiver
from agp.ptp.sections import Identity, Packet, Payload
from agp.quant.turboquant import TurboQuant

MFP, TFP = "3f" * 32, "a1" * 32


def _packet(rotation: str, seq: int) -> bytes:
    x = np.random.default_rng(seq).standard_normal((1, 64)).astype(np.float32)
    blob = TurboQuant(64, 4, seed=seq, rotation=rotation).encode(x)
    return encode_packet(Packet(Identity(MFP, TFP, "q4_k_m", 5, 0, 1, 6, seq, "host-a", "host-b"), Payload(blob)))


def test_dense_rotation_refused_by_default_without_advancing_replay():
    recv = Receiver(MFP, TFP, "q4_k_m", "host-b")
    with pytest.raises(UnknownCodec, match="dense TurboQuant rotation") as e:
        recv.receive(_packet("dense", 1))
    assert e.value.reason == "codec" and e.value.section == "payload"
    assert recv.accepted == 0
    recv.receive(_packet("hadamard", 1))  # same (session, seq): the refused packet did not use it up


def test_dense_rotation_accepted_when_allowed():
    recv = Receiver(MFP, TFP, "q4_k_m", "host-b", allow_dense=True)
    p = recv.receive(_packet("dense", 3))
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    y = recv.state(p)
    assert y.shape == (1, 64)
    assert float((x * y).sum() / np.linalg.norm(x) / np.linalg.norm(y)) > 0.98
