"""asv: AGP-PTP packet bytes (track_), encode/decode/receive time (time_) and checksum overhead."""
import zlib

import numpy as np

from agp.bench.ptp_fuzz import receiver, sample_packet
from agp.ptp.packet import decode_packet, encode_packet
from agp.bench.codecs import synthetic
from agp.quant.registry import make_codec

CODECS = ["fp16", "q8_0", "tq4", "tq2"]
DIMS = [640, 1536, 2048]


class Packets:
    params = (CODECS, DIMS)
    param_names = ["codec", "dim"]

    def setup(self, codec, dim):
        rng = np.random.default_rng(0)
        self.pkt = sample_packet(rng, seq=1, dim=32, codec="fp16")
        self.pkt.identity.span_len = 1
        self.pkt.payload.residual = make_codec(codec, dim).encode(synthetic(dim, 1, 0))
        self.data = encode_packet(self.pkt)

    def time_encode_packet(self, codec, dim):
        encode_packet(self.pkt)

    def time_decode_packet(self, codec, dim):
        decode_packet(self.data)

    def time_receive_and_decode_state(self, codec, dim):
        r = receiver()
        r.receive(self.data).payload.array()

    def peakmem_receive(self, codec, dim):
        receiver().receive(self.data)

    def track_packet_bytes(self, codec, dim):
        return len(self.data)

    track_packet_bytes.unit = "bytes"


class Checksum:
    """CRC-32 cost relative to the packet: the whole packet is checksummed twice (per section + whole)."""

    params = [640, 1536, 2048]
    param_names = ["dim"]

    def setup(self, dim):
        self.data = encode_packet(_fp16_packet(dim))

    def time_crc32_twice(self, dim):
        zlib.crc32(self.data)
        zlib.crc32(self.data)

    def track_crc_bytes(self, dim):
        # checksum bytes on the wire: one CRC per present section (mask bits) + the packet CRC
        return 4 * (1 + bin(self.data[6]).count("1"))

    track_crc_bytes.unit = "bytes"


def _fp16_packet(dim):
    rng = np.random.default_rng(0)
    p = sample_packet(rng, seq=1, dim=32, codec="fp16")
    p.identity.span_len = 1
    p.payload.residual = make_codec("fp16", dim).encode(synthetic(dim, 1, 0))
    return p
