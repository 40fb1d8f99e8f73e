"""`agp serve --layers b:L`: the resume server, the corrective side of a two-host split."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agp.errors import AGPError


def add_parser(sub):
    from agp.serve.server import DEFAULT_PORT, ServeArgs
    d = ServeArgs()
    p = sub.add_parser("serve", help="run the resume server: layers [b, L) and the head for `agp generate --remote`",
                       description="The corrective side of a two-host split. Clients run layers [0, b) and send "
                                   "each span of boundary states as AGP-PTP packets; the server holds every "
                                   "session's KV for layers [b, L), and answers the next token (naive split) or "
                                   "the accepted count of a drafted span (lossless two-host speculative "
                                   "decoding). Binds 127.0.0.1 unless told otherwise; any other address needs "
                                   "--key-file, and every frame is then authenticated with HMAC-SHA256. "
                                   "See docs/serve.md.")
    p.add_argument("--layers", required=True, metavar="b:L",
                   help="the layers this server runs: b is the split (the client's --split), L the model's depth")
    p.add_argument("--host", default=d.host, help=f"address to bind (default {d.host})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 picks one)")
    p.add_argument("--key-file", default=None,
                   help="file holding the shared HMAC key (at least 16 bytes); required off loopback")
    p.add_argument("--run", default=None, help="serve the backbone this run's heads were made on (default runs/latest)")
    p.add_argument("--model", default=None, help="mlx-lm model directory (default: the run's backbone, else embedded)")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, help=f"sessions held at once, LRU beyond "
                   f"(default {d.max_sessions})")
    p.add_argument("--idle-timeout", type=float, default=d.idle_s, metavar="S",
                   help=f"drop sessions and connections idle this long (default {d.idle_s:g} s)")
    p.set_defaults(func=main)


def parse_layers(text: str, n_layers: int) -> int:
    b, sep, last = text.partition(":")
    if not sep or not b.isdigit() or not last.isdigit():
        raise AGPError(f"--layers {text!r} must be b:L, e.g. 6:{n_layers}")
    b, last = int(b), int(last)
    if last != n_layers or not 0 < b < n_layers:
        raise AGPError(f"--layers {text}: this model has {n_layers} layers, so give b:{n_layers} with 0 < b < {n_layers}")
    return b


def read_key(path: str | None) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise AGPError(f"--key-file {path} does not exist")
    key = p.read_bytes().strip()
    if len(key) < 16:
        raise AGPError(f"--key-file {path} holds {len(key)} bytes; use at least 16 (e.g. `head -c 32 /dev/urandom > {path}`)")
    return key


def main(args) -> int:
    from agp.backbone import load
    from agp.runtime.session import resolve_backbone
    from agp.serve.server import ResumeServer, ServeArgs

    key = read_key(args.key_file)
    _, model, adapter = resolve_backbone(args.run, args.model, False, "agp serve")
    bb = load(model, adapter=adapter)
    layer = parse_layers(args.layers, bb.n_layers)
    server = ResumeServer(bb, layer, ServeArgs(host=args.host, port=args.port, max_sessions=args.max_sessions,
                                               idle_s=args.idle_timeout), key=key)
    bound: list = []

    async def serve():
        task = asyncio.create_task(server.serve(bound=bound))
        while not bound and not task.done():     # the bound port, once the socket is listening
            await asyncio.sleep(0.01)
        if bound:
            host, port = bound[0]
            print(f"agp serve: layers {layer}:{bb.n_layers} of {bb.fingerprint[:12]} on {host}:{port}"
                  f"{' (keyed)' if key else ''}; Ctrl-C stops", file=sys.stderr, flush=True)
        await task

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        print(f"agp serve: stopped; {server.stats.to_dict(server.sessions)}", file=sys.stderr)
        return 130
    except OSError as e:
        raise AGPError(f"cannot bind {args.host}:{args.port} ({e.strerror or e}); choose another --port") from None
    return 0
