"""The revive operation behind the routed mode's `revive_local` action.

Revive = the depth-routing module at block l (stage 3, agp/heads/depth.py) over the states the
first segment already computed (every block 0..l), then the tuned-lens translator, the final norm
and the runtime's shortlist rows: one token emitted at block l for ~module + shortlist MACs, instead
of running the remaining layers and the vocabulary-wide head. The depth stage measures which block
(D or the late boundary) to revive at and saves the operation in <run>/depth/revive/.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from agp import io
from agp.errors import AGPError
from agp.heads.depth import Decoder, DepthModule
from agp.heads.exit import top1_probability
from agp.runtime.cost import Cost

TRANSLATOR, META = "translator.safetensors", "revive.json"


def save_revive(d: Path, module: DepthModule, translator, shortlist, fingerprint: str, meta: dict) -> None:
    d = Path(d)
    module.save(d, {"model_fingerprint": fingerprint, "decoder": "controller tuned-lens translator"})
    io.write_safetensors(d / TRANSLATOR, {"W": mx.array(translator.W), "b": mx.array(translator.b)})
    io.write_json(d / META, {**meta, "model_fingerprint": fingerprint, "layer": module.layer,
                             "shortlist": np.asarray(shortlist).tolist()})


class Reviver:
    """`token(states)` -> (token id, top-1 probability, Cost); `states` maps block -> [1, 1, H]."""

    def __init__(self, bb, module: DepthModule, decoder: Decoder):
        self.module, self.decoder, self.layer = module, decoder, module.layer
        self.sources = module.sources

    @classmethod
    def load(cls, bb, d: Path) -> "Reviver":
        from agp.oracle.probes import Translator
        d = Path(d)
        if not (d / META).exists():
            raise AGPError(f"no revive operation at {d}; run `agp run --stage depth`")
        meta = json.loads((d / META).read_text())
        module, _ = DepthModule.load(d, bb.fingerprint, meta.get("layer"))
        w = mx.load(str(d / TRANSLATOR))
        if not all(bool(mx.all(mx.isfinite(v)).item()) for v in w.values()):
            raise AGPError(f"revive translator at {d} has non-finite values; rerun `agp run --stage depth`")
        t = Translator(np.asarray(w["W"]), np.asarray(w["b"]))
        return cls(bb, module, Decoder(bb, np.asarray(meta["shortlist"], np.int32), t))

    def macs(self) -> int:
        return self.module.macs() + self.decoder.macs()

    def token(self, states: dict):
        h = self.module.apply({s: states[s].reshape(-1, states[s].shape[-1]) for s in self.sources})
        z = self.decoder.logits(h)
        top = mx.argmax(z, axis=-1)
        p1 = top1_probability(z)
        mx.eval(top, p1)
        return int(self.decoder.ids_np[int(top[0].item())]), float(p1[0].item()), Cost(self.macs(), self.macs())
