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


def build(args: DataArgs, out: str | Path, progress: bool = False) -> dict:
    """Build every lane into `out` (replaced atomically); returns the dataset manifest."""
    t0 = time.perf_counter()
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
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
            "version": 1, "source": str(args.source) if args.source else "default", "formats": formats,
            "config": args.to_dict(),
            "read": {"records": n_read, "malformed": stats.malformed, "malformed_locations": stats.locations},
            "rule_order": [name for name, _ in RULES], "rules": counts, "kept": len(kept),
            "lanes": lanes_meta, "seconds": round(time.perf_counter() - t0, 3),
        }
        io.write_json(tmp / MANIFEST, manifest)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace directory `out` by `tmp` with renames only (old one removed afterwards)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old.{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_manifest(data_dir: str | Path) -> dict:
    """The dataset manifest of a built lane directory, or a clear error."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise AGPError(f"{data_dir} is not a built dataset (no {MANIFEST}); build it with `agp data build`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AGPError(f"corrupt dataset manifest {path}: {e}; rebuild with `agp data build`") from e


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
    lines += ["", f"{'lane':<10}" + "".join(f"{s:>9}" for s in SPLITS) + f"{'total':>9}  sha256 (train)"]
    for lane, splits in man["lanes"].items():
        n = [splits[s]["rows"] for s in SPLITS]
        lines.append(f"{lane:<10}" + "".join(f"{x:>9}" for x in n) + f"{sum(n):>9}  {splits['train']['sha256'][:16]}")
    return "\n".join(lines)
