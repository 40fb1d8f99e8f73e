"""asv: the transfer wire at the late boundary — encode/decode time of one span's states per
codec (time_), the resumed KL, top-1 and bytes per state the run's transfer stage recorded
(track_). Reads a finished run with the transfer stage (env AGP_RUN, else runs/latest); without
one the benchmarks are skipped (NotImplementedError: asv reports them as not run)."""
import agp  # noqa: F401  (fast BLAS before mlx)
import json
import os
from pathlib import Path

import numpy as np

CODECS = ["fp16", "q8_0", "tq8", "tq4", "tq2"]


def _run_dir() -> Path:
    p = Path(os.environ.get("AGP_RUN") or Path(os.environ.get("AGP_RUNS", "runs")) / "latest").resolve()
    if not (p / "transfer" / "rate_distortion.json").exists():
        raise NotImplementedError(f"no finished transfer stage at {p}; run `agp run` first")
    return p


class _Recorded:
    """The quality figures the run's table row (`self.row`, set in setup) holds for a parameter."""

    def track_resumed_kl(self, cache, param):
        return self.row["kl"]
    track_resumed_kl.unit = "nats"

    def track_resumed_top1(self, cache, param):
        return self.row["top1"]
    track_resumed_top1.unit = "agreement"

    def track_bytes_per_state(self, cache, param):
        return self.row["bytes_per_token"]
    track_bytes_per_state.unit = "bytes"


class Wire(_Recorded):
    """One span of held-out states at B (47 positions at CI size), through each codec."""
    params = CODECS
    param_names = ["codec"]
    timeout = 300

    def setup_cache(self):
        run = _run_dir()
        m = json.loads((run / "manifest.json").read_text())["stages"]["transfer"]["metrics"]
        late = m["boundaries"]["late"]
        with np.load(run / "transfer" / f"dataset_L{late}.npz") as z:
            held = z["split"] == "heldout"
            first = z["prompt"][held][0]
            rows = z["states"][held & (z["prompt"] == first)]
        from agp.transfer.resume import SINK_LIMIT
        rows = rows[np.abs(rows).max(axis=1) <= SINK_LIMIT]         # sinks travel in f32, not through the codec
        table = {(r["layer"], r["codec"]): r for r in m["rate_distortion"]}
        return {"states": rows, "late": late, "table": {c: table.get((late, c)) for c in CODECS}}

    def setup(self, cache, codec):
        from agp.quant.registry import make_codec
        self.x = cache["states"]
        self.codec = make_codec(codec, self.x.shape[1])
        self.blob = self.codec.encode(self.x)
        self.row = cache["table"][codec]
        if self.row is None:
            raise NotImplementedError(f"the run's transfer stage did not sweep {codec}")

    def time_encode(self, cache, codec):
        self.codec.encode(self.x)

    def time_decode(self, cache, codec):
        self.codec.decode(self.blob)



# the CI sweep (agp.transfer.adapter.AdapterArgs defaults)
ADAPTERS = [f"ta{code}" for code in ("96-hidden/q8_0", "96-fisher/q8_0", "256-hidden/tq3", "256-fisher/tq3",
                                      "288-hidden/q8_0", "288-fisher/q8_0")]


class Adapter(_Recorded):
    """The learned transfer adapters the run saved: encode (code + its wire codec) and decode (codec + state)
    time of the same span, and the resumed KL, top-1 and bytes per state their table rows hold."""
    params = ADAPTERS
    param_names = ["adapter"]
    timeout = 300

    def setup_cache(self):
        cache = Wire.setup_cache(self)
        run = _run_dir()
        m = json.loads((run / "manifest.json").read_text())["stages"]["transfer"]
        cache["paths"] = {n: str(run / rel) for n, rel in m.get("artifacts", {}).get("adapters", {}).items()}
        cache["rows"] = {r["codec"]: r for r in m["metrics"]["rate_distortion"] if r.get("adapter")}
        cache["fingerprint"] = m["metrics"]["model_fingerprint"]
        return cache

    def setup(self, cache, adapter):
        from agp.quant.registry import make_codec
        from agp.transfer.adapter import TransferAdapter
        if adapter not in cache["paths"]:
            raise NotImplementedError(f"the run's transfer stage did not train {adapter}")
        self.adapter, _ = TransferAdapter.load(Path(cache["paths"][adapter]), cache["fingerprint"])
        self.x = cache["states"]
        self.codec = make_codec(self.adapter.codec, self.adapter.width)
        self.blob = self.codec.encode(self.adapter.encode(self.x))
        self.row = cache["rows"][adapter]

    def time_encode(self, cache, adapter):
        self.codec.encode(self.adapter.encode(self.x))

    def time_decode(self, cache, adapter):
        self.adapter.decode(self.codec.decode(self.blob))
