"""Wire a `Generator` from a run: the backbone its heads were made on, and the heads a mode needs."""
from __future__ import annotations

from pathlib import Path

from agp.errors import AGPError


def open_generator(mode: str, args, run_dir: str | None = None, model: str | None = None,
                   controller_units: str | None = None):
    """A Generator for `mode`; `controller_units` (routed only) serves the controller from its
    Core ML package on those compute units (agp.ane.sidecar) instead of MLX."""
    from agp import runs
    from agp.backbone import load
    from agp.runtime import heads as H
    from agp.runtime.generator import Generator, decoder_class

    decoder_class(mode)                     # an unknown mode fails before any loading
    run = None
    if run_dir is not None:
        run = runs.Run(run_dir)
    elif H.needs_heads(mode) or (runs.runs_root() / "latest").exists():
        try:
            run = runs.latest_run()
        except AGPError:
            if H.needs_heads(mode):
                raise AGPError(f"mode {mode} needs a run with the runtime stage; run `agp run` "
                               f"(or give --run DIR)") from None
    adapter = None
    if run is not None and model is None:
        try:   # the backbone the run's heads were made on: its model and adapter
            src = H.backbone_source(run)
            model, adapter = src.get("model"), src.get("adapter_dir")
            if adapter and not Path(adapter).exists():
                raise AGPError(f"the run's adapter {adapter} is missing; rerun `agp run --stage adapter`")
        except AGPError:
            if H.needs_heads(mode):
                raise
    bb = load(model, adapter=adapter)
    heads = H.load(run, bb, mode) if H.needs_heads(mode) else None
    if controller_units is not None:
        if mode != "routed":
            raise AGPError(f"--controller-on applies to mode routed (the only mode with a controller), not {mode}")
        from agp.ane.sidecar import serve_controller
        heads.controller = serve_controller(run.path, heads.controller, controller_units)
    return Generator(bb, mode, heads, args)
