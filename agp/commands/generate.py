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
    p.add_argument("--remote", default=None, metavar="HOST:PORT",
                   help="two hosts: run layers [0, b) here and [b, L) on an `agp serve --layers b:L` there. "
                        "Mode speculative crosses once per drafted round and equals full; mode full is the naive "
                        "split (every token crosses); routed (split at its late boundary) and entropy (at its "
                        "exit layer) cross only for tokens that go deeper, and equal their one-host runs")
    p.add_argument("--split", type=int, default=None, metavar="b",
                   help="with --remote: the boundary layer (default: the server's)")
    p.add_argument("--codec", default="f32",
                   help="with --remote: how boundary states cross (f32 exact, the default; fp16, q8_0, tq4 are "
                        "lossy; attention sinks always cross in f32)")
    p.add_argument("--key-file", default=None, help="with --remote: the server's HMAC key file")
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


def remote_split(args, links: list):
    """The decoder factory for --remote (None without it); the link it opens goes in `links`."""
    if args.remote is None:
        for flag in ("split", "key_file"):
            if getattr(args, flag) is not None:
                raise AGPError(f"--{flag.replace('_', '-')} applies only with --remote HOST:PORT")
        return None
    from agp.commands.serve import read_key
    from agp.serve.client import Client, parse_address
    from agp.serve.remote import RemoteSplit, remote_decoder
    address, key = parse_address(args.remote), read_key(args.key_file)
    remote_decoder(args.mode, None)           # a mode that cannot run split fails before any loading

    def make(bb):
        split = args.split
        if split is None:
            with Client(address, key) as c:
                split = c.hello()["layers"][0]
        links.append(RemoteSplit(bb, address, split, codec=args.codec, key=key))
        return remote_decoder(args.mode, links[-1])
    return make


def main(args) -> int:
    from agp.runtime import GenerateArgs, Generator
    from agp.runtime.session import open_generator

    ga = GenerateArgs(max_new_tokens=args.max_new_tokens, skipped_kv=args.skipped_kv)
    if args.draft_max is not None:
        ga.draft_max = args.draft_max
    if args.threshold is not None:
        ga.draft_min_confidence = ga.entropy_threshold = args.threshold
    prompt = read_prompt(args)
    links = []
    gen: Generator = open_generator(args.mode, ga, run_dir=args.run, model=args.model,
                                    adapt_heads=controller_sidecar(args.mode, args.controller_on),
                                    decoder=remote_split(args, links))
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
    summary = gen.summary.to_dict()
    if links:
        summary["link"] = links[0].telemetry(gen.summary.tokens)
        links[0].close()
    if args.json:
        out.write(json.dumps({"summary": summary}) + "\n")
    else:
        out.write("\n")
        print(gen.summary.line(), file=sys.stderr)
        if links:
            link = summary["link"]
            print(f"link: {link['round_trips']} round trips, {link.get('bytes_up_per_token', 0):.0f} B/token up, "
                  f"rtt p50 {link['rtt_ms_p50']:.2f} ms p99 {link['rtt_ms_p99']:.2f} ms, "
                  f"{link['reconnects']} reconnects", file=sys.stderr)
    return 130 if gen.summary.interrupted else 0
