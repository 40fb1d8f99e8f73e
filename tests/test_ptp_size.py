"""Done-when of issue 5: a 4-bit TurboQuant packet of one 640-d hidden state is at most 1/3 of its fp16
packet, headers and all five sections included."""

import numpy as np

from agp.ptp.packet import encode_packet
from agp.ptp.sections import Identity, Packet, Payload, Semantic, Trajectory, Vitality
from agp.quant.codec import FP16, Q8_0
from agp.quant.turboquant import TurboQuant
from gates.thresholds import PTP_TQ4_OVER_FP16_MAX


def _state():
    # a residual-stream-like vector: Gaussian bulk plus a few large outlier channels
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 640)).astype(np.float32) * 4
    x[0, [17, 211, 398]] = [180.0, -95.0, 60.0]
    return x


def _packet(blob):
    idn = Identity("3f" * 32, "a1" * 32, "q4_k_m", 0x1D2C3B4A59687766, 1024, 1, 12, 41, "mac-mini-a", "mac-studio")
    return Packet(idn, Payload(blob, hint=(0.995, 1.0)),
                  Trajectory(0.8, 0.2, 0.1, 0.3, 0.6, 0.05, 0.9, 0.85),
                  Vitality(412.0, 2.1, 0.3, 0.7, 0.4, frozenset({"weak"})),
                  Semantic([(2, 0.7), (5, 0.4)], [(1, 0.9)], [(90210, 0.8)], 0.12))


def test_tq4_packet_is_at_most_a_third_of_fp16():
    x = _state()
    fp16 = len(encode_packet(_packet(FP16().encode(x))))
    tq4 = len(encode_packet(_packet(TurboQuant(640, 4).encode(x))))
    assert tq4 / fp16 <= PTP_TQ4_OVER_FP16_MAX, (tq4, fp16)
    # and the codes themselves are tight: 640 x 4 bits = 320 bytes, no padding
    assert len(TurboQuant(640, 4).encode(x)) == 6 + 2 + 4 + 320  # codec header, flags+seed, norm, codes


def test_packet_sizes_are_ordered():
    x = _state()
    sizes = {name: len(encode_packet(_packet(c.encode(x)))) for name, c in
             [("fp16", FP16()), ("q8_0", Q8_0()), ("tq8", TurboQuant(640, 8)), ("tq4", TurboQuant(640, 4)),
              ("tq3", TurboQuant(640, 3)), ("tq2", TurboQuant(640, 2))]}
    assert sizes["fp16"] > sizes["q8_0"] > sizes["tq8"] > sizes["tq4"] > sizes["tq3"] > sizes["tq2"]
    assert sizes["tq4"] - sizes["tq3"] == 80 and sizes["tq3"] - sizes["tq2"] == 80  # 640 bits per bit of width
