"""Build the lanes: read sources -> filter -> lanes -> split -> write, with a dataset manifest.

Layout written under `out`:
  <lane>/<split>.jsonl   for lane in sft, routing, semantic, transfer; split in train, valid, heldout
  transfer/schema.json   the transfer lane's row schema (rows come from stage 5)
  manifest.json          source, formats, malformed lines, per-rule counts, per lane/split rows + sha256
The whole directory is built beside `out` and renamed into place, so a failure never leaves a
partial dataset behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agp import io
from agp.config import ConfigMixin
from agp.data import lanes as L
from agp.data.default_corpus import CorpusArgs, default_records
from agp.data.filters import RULES, FilterArgs, apply_filters
from agp.data.jsonl import ReadStats
from agp.data.sources import read_source
from agp.data.splits import SPLITS
from agp.errors import AGPError

MANIFEST = "manifest.json"
KIND = "agp-data-lanes"   # the manifest's "kind": what marks a directory as ours to replace
MAX_OVERSAMPLE = 100      # semantic copies of one prompt; more only inflates the lane


@dataclass
class DataArgs(ConfigMixin):
    source: str | None = None      # directory (or file) of transcripts; None = offline default corpus
    format: str | None = None      # force one reader instead of sniffing each file
    oversample: int = 3            # semantic lane: copies of a prompt that expresses a concept
    corpus: dict | None = None     # CorpusArgs overrides for the default corpus
    filters: dict | None = None    # FilterArgs overrides


def collect(args: DataArgs) -> tuple[list[dict], dict, ReadStats]:
    """Records from the source (or the default corpus), the file->format map and read stats."""
    stats = ReadStats()
    if args.source:
        records, formats = read_source(args.source, stats, args.format)
    else:
        records = default_records(CorpusArgs.from_dict(args.corpus or {}), stats)
        formats = {"default": "code+docs+chat"}
    return records, formats, stats


def make_lanes(kept: list[dict], oversample: int) -> dict[str, list[dict]]:
    """lane -> rows (deduplicated by id, in record order)."""
    out: dict[str, list[dict]] = {lane: [] for lane in L.LANES}
    seen: dict[str, set] = {lane: set() for lane in L.LANES}

    def add(lane, row):
        if row is not None and row["id"] not in seen[lane]:
            seen[lane].add(row["id"])
            out[lane].append(row)

    for rec in kept:
        add("sft", L.sft_row(rec))
        add("routing", L.routing_row(rec))
        for row in L.semantic_rows(rec, oversample):
            add("semantic", row)
    return out


def build(args: DataArgs, out: str | Path, progress: bool = False, force: bool = False) -> dict:
    """Build every lane into `out` (replaced atomically); returns the dataset manifest.

    `out` may be new, empty, or an earlier `agp data build` output; anything else is refused
    unless `force` (see check_out)."""
    t0 = time.perf_counter()
    if not 1 <= args.oversample <= MAX_OVERSAMPLE:
        raise AGPError(f"oversample must be in 1..{MAX_OVERSAMPLE}, got {args.oversample}; "
                       f"it is how many copies of a concept prompt the semantic lane keeps")
    out = check_out(out, args.source, force)
    records, formats, stats = collect(args)
    n_read = len(records)
    kept, counts = apply_filters(records, FilterArgs.from_dict(args.filters or {}))
    where = args.source or "the default corpus"
    if not kept:
        dropped = ", ".join(f"{k}: {v['dropped']}" for k, v in counts.items() if v["dropped"]) or "nothing dropped"
        raise AGPError(f"no records left after filtering {n_read} read from {where} "
                       f"({dropped}); "
                       f"check the source holds real conversations (see docs/data.md for the rules)")
    rows = make_lanes(kept, args.oversample)
    tmp = _scratch_dir(out)
    try:
        lanes_meta = {}
        for lane in L.LANES:
            lanes_meta[lane] = {}
            for split in SPLITS:
                part = [r for r in rows[lane] if r["split"] == split]
                path = tmp / lane / f"{split}.jsonl"
                io.write_jsonl(path, part)
                lanes_meta[lane][split] = {"rows": len(part), "sha256": io.sha256_file(path),
                                           "path": f"{lane}/{split}.jsonl"}
        io.write_json(tmp / "transfer" / "schema.json", L.TRANSFER_SCHEMA)
        manifest = {
            "kind": KIND, "version": 1, "source": str(args.source) if args.source else "default", "formats": formats,
            "config": args.to_dict(),
            "read": {"records": n_read, "malformed": stats.malformed, "malformed_locations": stats.locations},
            "rule_order": [name for name, _ in RULES], "rules": counts, "kept": len(kept),
            "lanes": lanes_meta, "seconds": round(time.perf_counter() - t0, 3),
        }
        io.write_json(tmp / MANIFEST, manifest)
        _swap_in(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AGPError(f"cannot write the dataset to {out} ({e.strerror}); choose a writable --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def is_lanes_dir(path: Path) -> bool:
    """True if `path` holds a dataset written by `agp data build` (recognised by its manifest)."""
    try:
        man = json.loads((path / MANIFEST).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(man, dict):
        return False
    # manifests from before "kind" existed carry the same lanes + rule_order layout
    return man.get("kind") == KIND or (man.get("version") == 1 and isinstance(man.get("lanes"), dict)
                                       and isinstance(man.get("rule_order"), list) and "kind" not in man)


def _protected(source: str | None) -> dict[Path, str]:
    """Directories never replaced, even with --force: the cwd and its parents, the source and its
    parents, and the home directory."""
    keep = {Path.home().resolve(): "your home directory"}
    cwd = Path.cwd().resolve()
    for p in (cwd, *cwd.parents):
        keep.setdefault(p, "the current directory" if p == cwd else "a parent of the current directory")
    if source:
        src = Path(source).expanduser().resolve()
        for p in (src, *src.parents):
            keep.setdefault(p, "the source" if p == src else "a parent of the source")
    return keep


def check_out(out: str | Path, source: str | None, force: bool) -> Path:
    """The output directory, refused when writing it could destroy what AGP did not write.

    Replaced silently: nothing there, an empty directory, or an earlier `agp data build` output.
    Replaced with --force: any other directory. Never: a file, a symlink, the current directory
    or a parent of it, the source or a parent of it, the home directory."""
    if not str(out).strip():
        raise AGPError("--out is empty; name the directory to write the lanes to (e.g. --out lanes)")
    path = Path(out).expanduser()
    if path.is_symlink():
        raise AGPError(f"--out {out} is a symlink; name the real directory (it is replaced, the link would not be)")
    if path.exists() and not path.is_dir():
        raise AGPError(f"--out {out} is an existing file, not a directory; choose another --out (files are never replaced)")
    resolved = path.resolve()
    what = _protected(source).get(resolved)
    if what is not None:
        raise AGPError(f"--out {out} is {what}; building there would delete it, choose a new directory for --out")
    if path.exists() and any(path.iterdir()) and not is_lanes_dir(path) and not force:
        raise AGPError(f"--out {out} exists and is not an `agp data build` output (no {MANIFEST} of kind {KIND}); "
                       f"choose a new directory, or pass --force to replace it")
    return path


def _scratch_dir(out: Path) -> Path:
    """A fresh directory beside `out` to build into (so the final step is a rename)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise AGPError(f"cannot create the dataset beside {out} ({e.strerror}); choose a writable --out") from None


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace directory `out` by `tmp` with renames only (old one removed afterwards).
    check_out has already refused anything that is not a directory we may replace."""
    old = None
    if out.is_dir() and not out.is_symlink():
        old = out.parent / f".{out.name}.old.{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_manifest(data_dir: str | Path) -> dict:
    """The dataset manifest of a built lane directory, or a clear error."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise AGPError(f"{data_dir} is not a built dataset (no {MANIFEST}); build it with `agp data build`")
    try:
        man = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AGPError(f"corrupt dataset manifest {path} ({type(e).__name__}); rebuild with `agp data build`") from None
    problem = _manifest_problem(man)
    if problem:
        raise AGPError(f"corrupt dataset manifest {path}: {problem}; rebuild with `agp data build`")
    return man


def _manifest_problem(man) -> str | None:
    """What is missing or mistyped in a dataset manifest (None when it has every field stats reads)."""
    if not isinstance(man, dict):
        return f"expected a JSON object, got {type(man).__name__}"
    for key, kind in (("source", str), ("read", dict), ("rule_order", list), ("rules", dict), ("kept", int),
                      ("lanes", dict)):
        if not isinstance(man.get(key), kind):
            return f"field '{key}' is missing or not a {kind.__name__}"
    read = man["read"]
    if not isinstance(read.get("records"), int) or not isinstance(read.get("malformed"), int) \
            or not isinstance(read.get("malformed_locations"), list):
        return "field 'read' needs records, malformed and malformed_locations"
    for name in man["rule_order"]:
        rule = man["rules"].get(name) if isinstance(name, str) else None
        if not isinstance(rule, dict) or not all(isinstance(rule.get(k), int) for k in ("dropped", "changed")):
            return f"rule {name!r} has no dropped/changed counts"
    for lane, splits in man["lanes"].items():
        for split in SPLITS:
            meta = splits.get(split) if isinstance(splits, dict) else None
            if not isinstance(meta, dict) or not isinstance(meta.get("rows"), int) \
                    or not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("path"), str):
                return f"lane {lane!r} split {split!r} needs rows, sha256 and path"
            if meta["path"] != f"{lane}/{split}.jsonl":   # never read a file outside the dataset
                return f"lane {lane!r} split {split!r} points at {meta['path']!r}, not {lane}/{split}.jsonl"
    return None


def verify_lanes(data_dir: str | Path, man: dict) -> None:
    """Re-hash every lane file the manifest lists; a missing or changed one is an error naming it."""
    data_dir = Path(data_dir)
    bad = []
    for splits in man["lanes"].values():
        for split in SPLITS:
            meta = splits[split]
            path = data_dir / meta["path"]
            if not path.is_file():
                bad.append(f"{meta['path']} (missing)")
            elif io.sha256_file(path) != meta["sha256"]:
                bad.append(f"{meta['path']} (sha256 differs)")
    if bad:
        raise AGPError(f"dataset {data_dir} no longer matches its manifest: {', '.join(bad)}; "
                       f"rebuild it with `agp data build`")


def load_lane(data_dir: str | Path, lane: str, split: str, verify: bool = True) -> list[dict]:
    """Rows of one lane split; with `verify`, its sha256 must match the manifest."""
    data_dir = Path(data_dir)
    man = load_manifest(data_dir)
    meta = man["lanes"].get(lane, {}).get(split)
    if meta is None:
        raise AGPError(f"dataset {data_dir} has no lane '{lane}' split '{split}'; rebuild with `agp data build`")
    path = data_dir / meta["path"]
    if verify and (not path.exists() or io.sha256_file(path) != meta["sha256"]):
        raise AGPError(f"{path} does not match the sha256 in {data_dir / MANIFEST} (changed or corrupt); "
                       f"rebuild with `agp data build`")
    return io.read_jsonl(path, "rebuild with `agp data build`")


def stats_table(man: dict) -> str:
    """Counts per lane/split, per rule and per source format, as plain-text tables."""
    lines = [f"source: {man['source']}   records read: {man['read']['records']}   kept: {man['kept']}   "
             f"malformed lines: {man['read']['malformed']}"]
    for loc in man["read"]["malformed_locations"][:10]:
        lines.append(f"  malformed: {loc}")
    lines += ["", f"{'rule':<20}{'dropped':>9}{'changed':>9}"]
    for name in man["rule_order"]:
        c = man["rules"][name]
        lines.append(f"{name:<20}{c['dropped']:>9}{c['changed']:>9}")
    fields = man["rules"].get("redact_secrets", {}).get("fields")
    if isinstance(fields, dict) and fields:
        lines.append("redacted per field: " + ", ".join(f"{k} {v}" for k, v in fields.items()))
    lines += ["", f"{'lane':<10}" + "".join(f"{s:>9}" for s in SPLITS) + f"{'total':>9}  sha256 (train)"]
    for lane, splits in man["lanes"].items():
        n = [splits[s]["rows"] for s in SPLITS]
        lines.append(f"{lane:<10}" + "".join(f"{x:>9}" for x in n) + f"{sum(n):>9}  {splits['train']['sha256'][:16]}")
    return "\n".join(lines)
