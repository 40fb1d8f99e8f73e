"""`agp generate PROMPT`: stream greedy text in a runtime mode, then one summary line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from agp.errors import AGPError


def add_parser(sub):
    p = sub.add_parser("generate", help="stream greedy text (full, speculative, exit:L, entropy, routed) with a cost summary",
                       description="Greedy generation through AGP's runtime. `full` equals mlx_lm.generate token for "
                                   "token; `speculative` is lossless (equals `full`); exit:L, entropy and routed are "
                                   "lossy. Modes other than full read the exit heads of a run's runtime stage.")
    p.add_argument("prompt", nargs="?", default=None,
                   help="prompt text; '-' or omitted reads stdin; @FILE reads a file")
    p.add_argument("--file", default=None, help="read the prompt from this file")
    p.add_argument("--mode", default="full",
                   help="full | speculative | speculative:exit | speculative:feature | exit:L | entropy | routed "
                        "(default full; speculative uses the draft the run's cost model chose: the exit head at "
                        "layer E, or the EAGLE-style feature draft head)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--run", default=None, help="run whose heads to use (default runs/latest)")
    p.add_argument("--model", default=None, help="mlx-lm model directory (default: the run's backbone, else embedded)")
    p.add_argument("--draft-max", type=int, default=None, metavar="K", help="speculative: most drafts per round")
    p.add_argument("--threshold", type=float, default=None,
                   help="speculative: draft confidence stop; entropy: exit confidence threshold")
    p.add_argument("--skipped-kv", choices=("catchup", "propagate"), default="catchup",
                   help="entropy/routed: KV of the layers an exited token skipped — catchup (run them later, "
                        "batched with the next deeper token; exact for the exited state) or propagate (CALM: "
                        "fill only their K/V from the exited state now; saves their MACs, approximate KV)")
    p.add_argument("--controller-on", default="mlx", choices=("mlx", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"),
                   help="routed: run the controller in MLX (default) or from its Core ML package on these compute "
                        "units (macOS; CPU_AND_NE is the Neural Engine sidecar; export it first with "
                        "`agp export coreml --heads controller --positions 1`)")
    p.add_argument("--json", action="store_true", help="print the events and the summary as JSON lines instead of text")
    p.set_defaults(func=main)


def read_prompt(args) -> str:
    if args.file:
        path = Path(args.file)
        if not path.exists():
            raise AGPError(f"prompt file {path} does not exist")
        return path.read_text()
    if args.prompt is None or args.prompt == "-":
        if sys.stdin.isatty():
            raise AGPError("no prompt: give PROMPT, --file FILE, or pipe text on stdin")
        return sys.stdin.read()
    if args.prompt.startswith("@") and len(args.prompt) > 1:
        return read_prompt(type(args)(file=args.prompt[1:], prompt=None))
    return args.prompt


def controller_sidecar(mode: str, controller_on: str):
    """The heads adapter that serves the routed controller from Core ML, or None for MLX."""
    if controller_on == "mlx":
        return None
    if mode != "routed":
        raise AGPError(f"--controller-on applies to mode routed (the only mode with a controller), not {mode}")

    def adapt(run, heads):
        import dataclasses

        from agp.ane.sidecar import serve_controller
        return dataclasses.replace(heads, controller=serve_controller(run.path, heads.controller, controller_on))
    return adapt


def main(args) -> int:
    from agp.runtime import GenerateArgs, Generator
    from agp.runtime.session import open_generator

    ga = GenerateArgs(max_new_tokens=args.max_new_tokens, skipped_kv=args.skipped_kv)
    if args.draft_max is not None:
        ga.draft_max = args.draft_max
    if args.threshold is not None:
        ga.draft_min_confidence = ga.entropy_threshold = args.threshold
    prompt = read_prompt(args)
    gen: Generator = open_generator(args.mode, ga, run_dir=args.run, model=args.model,
                                    adapt_heads=controller_sidecar(args.mode, args.controller_on))
    out = sys.stdout
    try:
        for ev in gen.generate(prompt):
            if args.json:
                out.write(json.dumps({"token": ev.token, "text": ev.text, "action": ev.action, "layers": ev.layers,
                                      "macs": ev.macs, "position": ev.position}) + "\n")
            else:
                out.write(ev.text)
            out.flush()
    except KeyboardInterrupt:
        gen.summary.interrupted = True
    if args.json:
        out.write(json.dumps({"summary": gen.summary.to_dict()}) + "\n")
    else:
        out.write("\n")
        print(gen.summary.line(), file=sys.stderr)
    return 130 if gen.summary.interrupted else 0
