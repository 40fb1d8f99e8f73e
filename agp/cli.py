"""`agp` command line: only wires subcommands (agp/commands/*.py) to the library."""
from __future__ import annotations

import os
import sys


def _caused_by_ctrl_c(error: BaseException) -> bool:
    """A Ctrl-C that lands while a compiled extension (mlx) initialises surfaces as an ImportError
    raised from the KeyboardInterrupt: walk the cause/context chain for it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


try:
    import argparse
    import importlib

    import agp  # noqa: F401  (fast BLAS before anything imports mlx)
    from agp.errors import AGPError
except (KeyboardInterrupt, ImportError) as e:  # Ctrl-C while the first imports run: nothing has started
    if not _caused_by_ctrl_c(e):
        raise
    print("agp: interrupted before anything ran", file=sys.stderr)
    sys.exit(130)

# Each module defines `add_parser(subparsers)` which sets `func` on its parser.
COMMANDS = ["run", "bench", "eval", "model", "data", "index", "generate", "export", "serve"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is an AGPError: one `agp: error: ...` line, exit 2."""

    def error(self, message):
        raise AGPError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
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
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(argv)  # recorded as the run's reproduction command
        return int(args.func(args) or 0)
    except AGPError as e:
        print(f"agp: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _reader_went_away()
    except KeyboardInterrupt:
        return _interrupted(argv)
    except Exception as e:  # e.g. mlx's ImportError raised from a Ctrl-C during its initialisation
        if not _caused_by_ctrl_c(e):
            raise
        return _interrupted(argv)


def _interrupted(argv: list[str]) -> int:
    resume = "; completed stages are kept, rerun to resume" if argv[:1] == ["run"] else ""
    print(f"agp: interrupted{resume}", file=sys.stderr)
    return 130


def _reader_went_away() -> int:
    """`agp ... | head -1`: the reader closed the pipe. Point stdout at /dev/null so the final flush
    at exit cannot raise again, and exit like a process killed by SIGPIPE (128 + 13)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass
    finally:
        os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
