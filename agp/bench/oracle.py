"""Oracle labelling speed: positions per second of the reference and fast probe paths, and the head-matmul bound.

One process, one batch of real positions (prompt pack, default Gemma 3 270M), the stage-2 probe
layers with fitted tuned-lens translators; every row is timed interleaved with the others, so the
ratios hold on a loaded machine even when the absolute figures do not.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from agp import argtypes


def add_arguments(p):
    p.add_argument("--model", default=None, help="mlx-lm directory or hub id (default: embedded Gemma 3 270M)")
    p.add_argument("--positions", type=argtypes.positive_int(), default=64,
                   help="positions per probe batch (the controller stage's --controller-probe-batch; default 64)")
    p.add_argument("--groups", type=argtypes.positive_int(), nargs="+", default=[2],
                   help="probe layers per head matmul to compare (default 2, the stage's)")
    p.add_argument("--repeats", type=argtypes.positive_int(), default=3, help="timed rounds; the best counts (default 3)")


def states(bb, positions: int, max_tokens: int = 128):
    """Hidden states at `positions` real positions of the prompt pack, at the default probe layers."""
    from agp.data.prompt_pack import build_prompt_pack
    from agp.oracle.probes import hidden_at
    from agp.train.controller import default_layers

    layers, decision = default_layers(bb.n_layers)
    wanted = layers + [bb.n_layers]
    got = {layer: [] for layer in wanted}
    rows = build_prompt_pack()
    with tqdm(total=positions, desc="hidden states", unit="pos") as bar:
        for row in rows:
            ids = bb.encode(row["text"], max_tokens=max_tokens, truncate=True)
            if len(ids) < 2:
                continue
            h = hidden_at(bb, ids, wanted, list(range(1, len(ids))))
            for layer in wanted:
                got[layer].append(h[layer])
            bar.update(len(ids) - 1)
            if sum(len(x) for x in got[bb.n_layers]) >= positions:
                break
    hidden = {layer: np.concatenate(v)[:positions] for layer, v in got.items()}
    return hidden, layers, decision


def main(args) -> int:
    from agp.backbone import load
    from agp.oracle.probes import fit_translator
    from agp.oracle.speed import measure

    bb = load(args.model)
    hidden, layers, decision = states(bb, args.positions)
    final = hidden[bb.n_layers]
    translators = {layer: fit_translator(hidden[layer], final) for layer in layers}
    print(f"oracle speed: {len(final)} positions per batch, probe layers {layers} (full stats at {decision}), "
          f"vocabulary {bb.vocab_size}, best of {args.repeats}")
    print(f"| group | method | s per batch | positions/s | bound positions/s | x bound | speed-up vs reference |")
    print("|---|---|---|---|---|---|---|")
    for group in args.groups:
        rows = measure(bb, hidden, final, layers, translators, [decision], group, repeats=args.repeats)
        ref = next(r for r in rows if r.method == "reference")
        for r in rows:
            print(f"| {group} | {r.method} | {r.seconds:.3f} | {r.positions_per_s:.1f} | "
                  f"{r.bound_positions_per_s:.1f} | {r.seconds / r.bound_seconds:.2f} | "
                  f"{ref.seconds / r.seconds:.2f} |")
    return 0
