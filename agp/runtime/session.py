"""Wire a `Generator` from a run: the backbone its heads were made on, and the heads a mode needs."""
from __future__ import annotations

from pathlib import Path

from agp.errors import AGPError


def open_generator(mode: str, args, run_dir: str | None = None, model: str | None = None, adapt_heads=None,
                   decoder=None):
    """A Generator for `mode`. `adapt_heads(run, heads) -> heads`, when given, replaces pieces of
    the loaded heads before the decoder is built (the command line's Neural Engine sidecar);
    `decoder(bb) -> decoder class` another host layout (the two-host split)."""
    from agp.backbone import load
    from agp.runtime import heads as H
    from agp.runtime.generator import Generator, decoder_class

    decoder_class(mode)                     # an unknown mode fails before any loading
    run, model, adapter = resolve_backbone(run_dir, model, H.needs_heads(mode), f"mode {mode}")
    bb = load(model, adapter=adapter)
    heads = H.load(run, bb, mode) if H.needs_heads(mode) else None
    if adapt_heads is not None:
        heads = adapt_heads(run, heads)
    return Generator(bb, mode, heads, args, decoder=decoder(bb) if decoder else None)


def resolve_backbone(run_dir: str | None, model: str | None, need_run: bool, what: str):
    """(run or None, model, adapter): the backbone the run's heads were made on (its model and
    adapter), or `model` as given; `need_run` makes a missing run an error naming `what` needs."""
    from agp import runs
    from agp.runtime import heads as H
    run = None
    if run_dir is not None:
        run = runs.Run(run_dir)
    elif need_run or (runs.runs_root() / "latest").exists():
        try:
            run = runs.latest_run()
        except AGPError:
            if need_run:
                raise AGPError(f"{what} needs a run with the runtime stage; run `agp run` (or give --run DIR)") from None
    adapter = None
    if run is not None and model is None:
        try:
            src = H.backbone_source(run)
            model, adapter = src.get("model"), src.get("adapter_dir")
            if adapter and not Path(adapter).exists():
                raise AGPError(f"the run's adapter {adapter} is missing; rerun `agp run --stage adapter`")
        except AGPError:
            if need_run:
                raise
    return run, model, adapter
