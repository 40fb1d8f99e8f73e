"""Data-lane ingestion throughput (asv): read + filter + lanes on the fixture transcripts.

The fixture directory (every input format, ~25 records, bad lines included) is replicated 200
times with per-copy edits so the near-duplicate rule sees distinct content, giving ~5,000 records.
"""
import json
import shutil
import tempfile
import time
from pathlib import Path

FX = Path(__file__).resolve().parents[1] / "fixtures" / "transcripts"
COPIES = 200


def _make_source() -> str:
    root = Path(tempfile.mkdtemp(prefix="agp-bench-data-"))
    for i in range(COPIES):
        d = root / f"copy{i:04d}"
        d.mkdir()
        for f in FX.glob("*.jsonl"):
            # a distinct word per copy keeps records distinct after digit normalisation
            tag = "".join(chr(97 + int(c)) for c in f"{i:04d}")
            (d / f.name).write_text(f.read_text().replace("the ", f"the {tag} ", 3))
    return str(root)


class Ingest:
    timeout = 300

    def setup_cache(self):
        return _make_source()

    def setup(self, src):
        self.out = Path(tempfile.mkdtemp(prefix="agp-bench-lanes-"))

    def teardown(self, src):
        shutil.rmtree(self.out, ignore_errors=True)

    def time_read_and_filter(self, src):
        from agp.data.filters import apply_filters
        from agp.data.jsonl import ReadStats
        from agp.data.sources import read_source
        apply_filters(read_source(src, ReadStats())[0])

    def peakmem_read_and_filter(self, src):
        from agp.data.filters import apply_filters
        from agp.data.jsonl import ReadStats
        from agp.data.sources import read_source
        apply_filters(read_source(src, ReadStats())[0])

    def time_build_lanes(self, src):
        from agp.data.build import DataArgs, build
        build(DataArgs(source=src), self.out / "d")

    def track_records_per_second(self, src):
        from agp.data.build import DataArgs, build
        t0 = time.perf_counter()
        man = build(DataArgs(source=src), self.out / "d")
        return man["read"]["records"] / (time.perf_counter() - t0)

    track_records_per_second.unit = "records/s"


class DefaultCorpus:
    timeout = 300

    def time_build_default_corpus(self):
        from agp.data.build import DataArgs, build
        out = Path(tempfile.mkdtemp(prefix="agp-bench-default-"))
        try:
            build(DataArgs(), out / "d")
        finally:
            shutil.rmtree(out, ignore_errors=True)
