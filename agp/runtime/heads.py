"""The heads a runtime mode needs, loaded from a run (`runs/<id>/runtime/`, `runs/<id>/controller/`).

What each mode needs: `full` nothing; `speculative` the draft the run chose (`speculative:exit`
the exit head at the draft layer, `speculative:feature` the feature draft head); `exit:L` an exit head
at L; `entropy` the draft exit head; `routed` the stage-2 controller plus exit heads at its
decision layer and late boundary (and the depth stage's revive operation when that stage finished). A missing piece is a one-line error naming the stage to run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from agp.errors import AGPError
from agp.heads.exit import ExitHead

STAGE = "runtime"


@dataclass
class RuntimeHeads:
    exits: dict = field(default_factory=dict)     # layer -> ExitHead
    draft_layer: int | None = None
    feature: object = None                        # FeatureDraftHead (EAGLE-style) or None
    draft_kind: str = "exit"                      # the draft `speculative` uses: "exit" or "feature"
    controller: object = None                     # (Controller, calibration) or None
    reviver: object = None                        # agp.runtime.revive.Reviver (depth stage) or None
    meta: dict = field(default_factory=dict)

    @property
    def draft(self) -> ExitHead | None:
        return self.exits.get(self.draft_layer)

    def exit_at(self, layer: int) -> ExitHead:
        if layer not in self.exits:
            have = ", ".join(str(x) for x in sorted(self.exits)) or "none"
            raise AGPError(f"no exit head at layer {layer} in this run (have: {have}); "
                           f"rerun `agp run --stage runtime` with that layer among --runtime-exit-layers")
        return self.exits[layer]


def runtime_dir(run) -> Path:
    return Path(run.path) / STAGE


def needs_heads(mode: str) -> bool:
    return mode != "full"


def backbone_source(run, finished: bool = True) -> dict:
    """The backbone the run's runtime heads were made on: {'adapter_dir': ... or None, 'fingerprint': ...}.
    `finished=False` is for the runtime stage itself, which loads its heads before it is done."""
    meta_path = runtime_dir(run) / "runtime.json"
    if (finished and run.stage(STAGE).get("status") != "done") or not meta_path.exists():
        raise AGPError(f"run {run.path} has no finished 'runtime' stage (its exit heads); "
                       f"run `agp run --stage runtime` first")
    return json.loads(meta_path.read_text())


def load(run, bb, mode: str, finished: bool = True) -> RuntimeHeads:
    """Heads for `mode` from `run`, checked against `bb`'s fingerprint and for NaN."""
    meta = backbone_source(run, finished)
    if meta.get("model_fingerprint") != bb.fingerprint:
        raise AGPError(f"run {run.path} was made for another model (fingerprint {str(meta.get('model_fingerprint'))[:12]}, "
                       f"this backbone {bb.fingerprint[:12]}); use that run's model or rerun `agp run --stage runtime`")
    heads = RuntimeHeads(draft_layer=meta.get("draft_layer"), draft_kind=meta.get("draft_kind", "exit"), meta=meta)
    for layer in meta.get("exit_layers", []):
        heads.exits[int(layer)], _ = ExitHead.load(bb, runtime_dir(run) / "exit_heads" / f"L{layer}")
    if meta.get("feature_draft"):
        from agp.heads.draft import FeatureDraftHead
        heads.feature, _ = FeatureDraftHead.load(bb, runtime_dir(run) / meta["feature_draft"])
    if mode == "routed":
        from agp.heads.controller import load_deployed
        run.require("controller", "mode routed")
        heads.controller = load_deployed(Path(run.path) / "controller" / "heads")
        if run.stage("depth").get("status") == "done":      # revive_local gets its operation
            from agp.runtime.revive import Reviver
            heads.reviver = Reviver.load(bb, Path(run.path) / "depth" / "revive")
    return heads
