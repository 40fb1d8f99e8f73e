"""Wire a `Generator` from a run: the backbone its heads were made on, and the heads a mode needs."""
from __future__ import annotations

from pathlib import Path

from agp.errors import AGPError


def open_generator(mode: str, args, run_dir: str | None = None, model: str | None = None, adapt_heads=None,
                   decoder=None):
    """A Generator for `mode`. `adapt_heads(run, heads) -> heads`, when given, replaces pieces of
    the loaded heads before the decoder is built (the command line's Neural Engine sidecar);
    `decoder(bb) -> decoder class` another host layout (the two-host split)."""
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
    if adapt_heads is not None:
        heads = adapt_heads(run, heads)
    return Generator(bb, mode, heads, args, decoder=decoder(bb) if decoder else None)
