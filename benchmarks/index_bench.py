"""Recall@10 of the approximate (HNSW) index against exact search, on real sentence embeddings.

The corpus is BIG-bench example inputs embedded with the default embedder: text like cards'.
    python benchmarks/index_bench.py [--n 6000] [--queries 400]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_results  # noqa: E402

from lorahub_plus.library.index import HNSW_THRESHOLD, build_index, normalize, search_index
from lorahub_plus.models import load_embedder
from lorahub_plus.paths import data_dir
from lorahub_plus.tasks import load_task


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--queries", type=int, default=400)
    args = parser.parse_args()
    texts = sorted({ex.input[:300] for f in sorted(data_dir().glob("*.json")) for ex in load_task(f).examples
                    if ex.input.strip()})
    random.Random(0).shuffle(texts)
    texts = texts[: args.n + args.queries]
    vectors = normalize(load_embedder().encode(texts, batch_size=128, show_progress_bar=True))
    corpus, queries = vectors[: args.n], vectors[args.n:]
    exact = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    start = time.perf_counter()
    index = build_index(corpus, hnsw_threshold=HNSW_THRESHOLD)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    _, ids = search_index(index, queries, 10)
    search_ms = (time.perf_counter() - start) / len(queries) * 1000
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]))
    summary = {"index": type(index).__name__, "vectors": len(corpus), "queries": len(queries),
               "recall@10": recall, "build_s": build_s, "search_ms_per_query": search_ms,
               "target recall@10": 0.95, "met": recall >= 0.95}
    print(write_results("index_bench", [], summary, "python benchmarks/index_bench.py"))
    print(summary)


if __name__ == "__main__":
    main()
