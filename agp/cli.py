"""`agp` command line: only wires subcommands (agp/commands/*.py) to the library."""
from __future__ import annotations

import argparse
import importlib
import sys

import agp  # noqa: F401  (fast BLAS before anything imports mlx)
from agp.errors import AGPError

# Each module defines `add_parser(subparsers)` which sets `func` on its parser.
COMMANDS = ["run", "bench", "model", "data", "index", "generate"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agp",
        description="AGP: conditional-compute fabric over an MLX decoder transformer. "
                    "`agp run` runs the staged curriculum into runs/<run_id>/ (see docs/).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"agp.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"agp.commands.{name}":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for user errors, printed as one line)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)  # recorded as the run's reproduction command
    try:
        return int(args.func(args) or 0)
    except AGPError as e:
        print(f"agp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agp: interrupted; completed stages are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
