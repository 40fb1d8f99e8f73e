"""asv: codec payload bytes (track_), encode/decode time (time_) and peak memory (peakmem_) at 640/1536/2048."""

from agp.bench.codecs import measure, synthetic
from agp.quant.registry import decode_any, make_codec

CODECS = ["fp16", "q8_0", "tq2", "tq3", "tq4", "tq8", "tq4-qjl"]
DIMS = [640, 1536, 2048]

class Codecs:
    """One hidden state (the packet case) and a batch of 256 (throughput)."""

    params = (CODECS, DIMS)
    param_names = ["codec", "dim"]

    def setup_cache(self):
        return {d: synthetic(d, 256, 0) for d in DIMS}

    def setup(self, data, codec, dim):
        self.x = data[dim]
        self.x1 = self.x[:1]
        self.codec = make_codec(codec, dim)
        self.blob = self.codec.encode(self.x)
        self.blob1 = self.codec.encode(self.x1)

    def time_encode_one(self, data, codec, dim):
        self.codec.encode(self.x1)

    def time_decode_one(self, data, codec, dim):
        decode_any(self.blob1)

    def time_encode_batch256(self, data, codec, dim):
        self.codec.encode(self.x)

    def time_decode_batch256(self, data, codec, dim):
        decode_any(self.blob)

    def peakmem_encode_batch256(self, data, codec, dim):
        self.codec.encode(self.x)

    def track_bytes_one_vector(self, data, codec, dim):
        return len(self.blob1)

    track_bytes_one_vector.unit = "bytes"

    def track_packet_bytes_one_vector(self, data, codec, dim):
        from agp.bench.codecs import one_packet_bytes
        return one_packet_bytes(self.codec, self.x1)

    track_packet_bytes_one_vector.unit = "bytes"

class Distortion:
    """Quality figures tracked over time (a regression in the codebook or rotation shows here)."""

    params = (["q8_0", "tq2", "tq3", "tq4", "tq8", "tq4-qjl"], [640, 2048])
    param_names = ["codec", "dim"]

    def setup_cache(self):
        return {d: synthetic(d, 512, 1) for d in (640, 2048)}

    def track_rel_mse(self, data, codec, dim):
        return measure(data[dim], codec, repeats=1)["rel_mse"]

    def track_cosine(self, data, codec, dim):
        return measure(data[dim], codec, repeats=1)["cos_mean"]

    def track_ip_relative_bias(self, data, codec, dim):
        return measure(data[dim], codec, repeats=1)["ip_bias"]

