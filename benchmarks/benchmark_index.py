"""asv: TurboQuant index on a 50 K-row subset of the real embedding table: search time, snapshot open memory, recall, bytes."""
import os
import tempfile

import numpy as np

ROWS, QUERIES = 50000, 200


class Index:
    """Single-query and batch search, opening a snapshot, recall@10 and bytes per vector, at 4 and 8 bits."""

    params = ([4, 8], [0, 100])
    param_names = ["bits", "rerank"]
    timeout = 600

    def setup_cache(self):
        import faiss

        from agp.index import IndexArgs, TQIndex
        from agp.bench.index import table_data

        base, queries = table_data(ROWS, QUERIES, 0)
        flat = faiss.IndexFlatIP(base.shape[1])
        flat.add(base)
        gt = flat.search(queries, 10)[1]
        root = tempfile.mkdtemp(prefix="agp-asv-index-")
        paths = {}
        for bits in (4, 8):
            paths[bits] = os.path.join(root, f"tq{bits}.tqidx")
            TQIndex.build(base, IndexArgs(bits=bits, store="fp16")).save(paths[bits])
        return {"paths": paths, "queries": queries, "gt": gt}

    def setup(self, data, bits, rerank):
        from agp.index import TQIndex

        self.path = data["paths"][bits]
        self.index = TQIndex.open(self.path)
        self.q = data["queries"]
        self.index.search(self.q[:1], 10, rerank=rerank)  # builds the scan engine outside the timing

    def time_search_single(self, data, bits, rerank):
        self.index.search(self.q[:1], 10, rerank=rerank)

    def time_search_batch(self, data, bits, rerank):
        self.index.search(self.q, 10, rerank=rerank)

    def peakmem_open_snapshot(self, data, bits, rerank):
        from agp.index import TQIndex

        TQIndex.open(self.path)

    def track_recall_at_10(self, data, bits, rerank):
        from agp.bench.index import recall

        return recall(self.index.search(self.q, 10, rerank=rerank)[1], data["gt"])

    track_recall_at_10.unit = "recall"

    def track_bytes_per_vector(self, data, bits, rerank):
        return self.index.bytes_per_vector

    track_bytes_per_vector.unit = "bytes"
