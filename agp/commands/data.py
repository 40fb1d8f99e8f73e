"""`agp data build|stats`: build the four lanes from a transcript folder (or the default corpus)."""
from __future__ import annotations

from agp import argtypes
from agp.data.build import MAX_OVERSAMPLE, DataArgs, build, load_manifest, stats_table, verify_lanes


def add_parser(sub):
    p = sub.add_parser("data", help="build and inspect the data lanes (sft, routing, semantic, transfer)",
                       description="Ingest transcripts, apply the named filter rules (docs/data.md) and write "
                                   "the four lanes with train/valid/heldout splits and a dataset manifest.")
    s = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = s.add_parser("build", help="build the lanes into an output directory",
                     description="Read every *.jsonl under --source (Claude Code sessions, verbose-all/prompts-all "
                                 "prompt logs, Codex history, prompt/response or chat-messages JSONL; the format is "
                                 "detected per file), filter, and write OUT/<lane>/<split>.jsonl + OUT/manifest.json. "
                                 "Without --source the offline default corpus is used. OUT is replaced atomically "
                                 "if it is new, empty or an earlier `agp data build` output; any other directory "
                                 "needs --force, and the source, the current directory and their parents never are.")
    b.add_argument("--source", metavar="DIR", default=None, help="transcripts directory or one .jsonl file")
    b.add_argument("--format", default=None, choices=["claude_session", "prompt_log", "codex_history", "pairs", "chat"],
                   help="force one reader for every file instead of detecting it")
    b.add_argument("--out", metavar="DIR", required=True,
                   help="output directory (an earlier build there is replaced; anything else needs --force)")
    b.add_argument("--force", action="store_true",
                   help="replace an existing --out directory that is not an `agp data build` output")
    b.add_argument("--oversample", type=argtypes.int_range(1, MAX_OVERSAMPLE), default=DataArgs.oversample,
                   help=f"semantic lane copies of a prompt expressing a concept, 1..{MAX_OVERSAMPLE} "
                        f"(default {DataArgs.oversample})")
    b.set_defaults(func=main_build)
    st = s.add_parser("stats", help="print counts per lane, rule and split of a built dataset")
    st.add_argument("dir", help="a directory written by `agp data build` (or <run>/adapter/data)")
    st.set_defaults(func=main_stats)


def main_build(args) -> int:
    man = build(DataArgs(source=args.source, format=args.format, oversample=args.oversample), args.out,
                force=args.force)
    print(stats_table(man))
    print(f"wrote {args.out} ({man['seconds']:.2f} s)")
    return 0


def main_stats(args) -> int:
    man = load_manifest(args.dir)
    verify_lanes(args.dir, man)   # the counts printed are those of the files present, not a stale record
    print(stats_table(man))
    return 0
