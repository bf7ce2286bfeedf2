"""FAISS indexes over normalised embeddings: exact when small, HNSW above a size threshold, IVF above another
(building HNSW over a million vectors takes the better part of an hour on 2 cores; IVF minutes)."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from lorahub_plus.library.atomic import atomic_file
from lorahub_plus.errors import LibraryError
from lorahub_plus.library.readers import sha256_file

HNSW_THRESHOLD = 4096
"""Exact search below this many vectors; above it HNSW (recall@10 measured in benchmarks/index_bench.py)."""
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128
IVF_THRESHOLD = 200_000
"""IVF (inverted lists over k-means cells) from this many vectors (benchmarks/scale_bench.py measures it)."""
IVF_PROBE_FRACTION = 1 / 128  # cells searched per query: recall@10 0.997, p99 4.1 ms at 1M (scale_bench sweep)


def ivf_lists(n: int) -> int:
    return int(4 * n ** 0.5)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def build_index(vectors: np.ndarray, hnsw_threshold: int = HNSW_THRESHOLD,
                ivf_threshold: int = IVF_THRESHOLD) -> faiss.Index:
    """Inner product over unit vectors (cosine similarity); exact, HNSW or IVF by size."""
    vectors = normalize(vectors)
    dim = vectors.shape[1]
    if len(vectors) < hnsw_threshold:
        index = faiss.IndexFlatIP(dim)
    elif len(vectors) >= ivf_threshold:
        lists = ivf_lists(len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).permutation(len(vectors))[: 64 * lists]]
        index.train(sample)  # k-means cells from a sample, seeded
        index.nprobe = max(1, int(lists * IVF_PROBE_FRACTION))
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    index.add(vectors)
    return index


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, k'), with k' = min(k, size); missing hits are dropped by callers (id -1)."""
    k = min(k, index.ntotal)
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    return index.search(normalize(queries), k)


def write_index(index: faiss.Index, path: Path) -> None:
    with atomic_file(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: Path, sha256: str | None = None, recorded_in: Path | None = None) -> faiss.Index:
    """A FAISS index file; a missing or damaged one (its sha256 differs from the one `recorded_in`
    a file) is a LibraryError naming both.

    The checksum comes first: faiss parses a damaged file in C++, where a bad size can exhaust memory.
    """
    if not Path(path).is_file():
        raise LibraryError(f"{path}: index file missing; run `lorahub-plus library repair`")
    if sha256 is not None and sha256_file(path) != sha256:
        raise LibraryError(f"{path}: damaged index file (sha256 differs from the one in {recorded_in}); "
                           "run `lorahub-plus library repair`")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:  # faiss reports every parse failure this way
        raise LibraryError(f"{path}: damaged index file ({str(e).strip().splitlines()[-1]}); "
                           "run `lorahub-plus library repair`") from e
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = HNSW_EF_SEARCH
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = max(1, int(index.nlist * IVF_PROBE_FRACTION))
    return index
