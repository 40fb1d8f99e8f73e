"""Two hosts: one host vs the naive split (AGP-PTP and mx.distributed) vs two-host speculative, at emulated RTTs, and the reliability runs."""
from __future__ import annotations

import json
import sys


def add_arguments(p):
    p.add_argument("--run", default=None, help="finished run with the runtime stage (default runs/latest)")
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts (plus one over 600 tokens; default 3)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per prompt and layout (default 32)")
    p.add_argument("--rtts-ms", default="0,0.1,0.3,1,5,20,50",
                   help="emulated round trips in ms, comma-separated (default 0,0.1,0.3,1,5,20,50: loopback, Thunderbolt, "
                        "Ethernet, a slow LAN, Wi-Fi, two WAN links)")
    p.add_argument("--split", type=int, default=None, help="boundary layer (default: the draft layer)")
    p.add_argument("--codec", default="f32", help="how states cross (default f32: lossless)")
    p.add_argument("--no-ring", action="store_true", help="skip the mx.distributed naive split")
    p.add_argument("--reliability", action="store_true",
                   help="also the long reliability runs: 64 clients x 1000 requests, 10 000 short sessions "
                        "(sizes: --clients, --requests, --sessions)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--sessions", type=int, default=10000)
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")


def main(args) -> int:
    from agp import runs
    from agp.errors import AGPError
    from agp.serve import measure as M
    from agp.train import serve as S

    try:
        rtts = [float(x) for x in args.rtts_ms.split(",") if x.strip()]
    except ValueError:
        raise AGPError(f"--rtts-ms {args.rtts_ms!r} must be comma-separated numbers of milliseconds") from None
    run = runs.Run(args.run) if args.run else runs.latest_run()
    cfg = S.ServeStageArgs(prompts=args.prompts, new_tokens=args.new_tokens, rtts_ms=rtts, split=args.split,
                           codec=args.codec, ring=not args.no_ring, clients=args.clients, requests=args.requests,
                           short_sessions=args.sessions)
    cfg.validate()
    su = S.setup(run, cfg)
    out = {"layouts": S.layouts(su, cfg), "ring": S.ring_split(su, cfg)}
    if args.reliability:
        out["reliability"] = S.reliability(su, cfg)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    from agp.report.serve import layout_lines, reliability_lines
    m = {"layouts": out["layouts"], "ring": out["ring"]}
    print("\n".join(layout_lines(m)))
    if args.reliability:
        print("\n".join(reliability_lines(out["reliability"])))
    print(f"run {run.id}; split {su.split}; prompts of {[len(p) for p in su.prompts]} tokens", file=sys.stderr)
    return 0
