"""The library at scale, on this machine: search over a million cards, and opening a library of many experts.

- search: `--cards` synthetic card vectors (each a real card-like sentence embedding of a BIG-bench input, plus
  noise, so that they cluster as real cards do), indexed as the library indexes (IVF from 200,000 vectors);
  p50 / p99 latency of one query and recall@10 against exact search, over `--queries` held-out real embeddings.
- open: the default library's experts plus `--synthetic` synthetic experts (a card, an embeddings file and a
  rank-1 adapter each, written directly and indexed once with `library repair`): the time and memory to open
  it, list it and search it (adapter weights are never read for that).

    python benchmarks/scale_bench.py [--cards 1000000] [--queries 500] [--synthetic 10000]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, write_results  # noqa: E402

from lorahub_plus.library.index import build_index, normalize, search_index
from lorahub_plus.library.store import Library
from lorahub_plus.models import load_embedder
from lorahub_plus.paths import REPO_ROOT, data_dir
from lorahub_plus.tasks import load_task


def anchors(n: int) -> np.ndarray:
    texts = sorted({ex.input[:300] for f in sorted(data_dir().glob("*.json"))[:400] for ex in load_task(f).examples
                    if ex.input.strip()})
    random.Random(0).shuffle(texts)
    return normalize(load_embedder().encode(texts[:n], batch_size=128, show_progress_bar=False))


def search_section(cards: int, queries: int) -> dict:
    real = anchors(2000 + queries)
    base, held = real[:2000], real[2000:]
    rng = np.random.default_rng(0)
    corpus = np.empty((cards, base.shape[1]), np.float32)
    for start in range(0, cards, 100_000):  # each card: an anchor plus noise of about its own size
        n = min(100_000, cards - start)
        corpus[start:start + n] = normalize(base[rng.integers(0, len(base), n)]
                                            + rng.normal(0, 0.04, (n, base.shape[1])).astype(np.float32))
    best_ids, best_scores = [], []  # exact top-10, chunk by chunk
    for s in range(0, cards, 200_000):
        sims = held @ corpus[s:s + 200_000].T
        top = np.argpartition(-sims, 10, 1)[:, :10]
        best_ids.append(top + s)
        best_scores.append(np.take_along_axis(sims, top, 1))
    ids, sims = np.concatenate(best_ids, 1), np.concatenate(best_scores, 1)
    exact = np.take_along_axis(ids, np.argsort(-sims, 1)[:, :10], 1)
    start = time.perf_counter()
    index = build_index(corpus)
    build_s = time.perf_counter() - start
    def measure():
        times, hits = [], []
        for q, truth in zip(held, exact):
            t = time.perf_counter()
            _, ids = search_index(index, q[None], 10)
            times.append((time.perf_counter() - t) * 1000)
            hits.append(len(set(ids[0].tolist()) & set(truth.tolist())) / 10)
        return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
                "recall@10": round(float(np.mean(hits)), 4)}

    result = {"cards": cards, "index": type(index).__name__, "build_s": round(build_s, 1), "queries": len(held),
              **measure()}
    if hasattr(index, "nprobe"):  # the cells searched per query: recall against time
        default, sweep = index.nprobe, {}
        for probes in sorted({max(1, index.nlist // d) for d in (512, 256, 128, 64, 32)}):
            index.nprobe = probes
            sweep[probes] = measure()
        index.nprobe = default
        result.update(nprobe=default, nlist=index.nlist, sweep=sweep)
    return result


def rss_mb() -> float:
    """This process's resident memory now (MB)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def open_section(synthetic: int) -> dict:
    from safetensors.torch import save_file
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lib"
        shutil.copytree(REPO_ROOT / "library", path)
        lib = Library(path)
        real = len(lib)
        template = lib.card(lib.names()[0])
        rng = np.random.default_rng(0)
        vectors = normalize(rng.normal(size=(synthetic, 2, 384)).astype(np.float32))
        module, (fan_in, fan_out) = next(iter(lib.base_shapes.items()))
        weights = {f"base_model.model.{module}.lora_A.weight": torch.zeros(1, fan_in),
                   f"base_model.model.{module}.lora_B.weight": torch.zeros(fan_out, 1)}
        config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [module.rsplit(".", 1)[-1]],
                  "base_model_name_or_path": lib.base_model, "task_type": "CAUSAL_LM"}
        for i in range(synthetic):
            folder = path / f"synthetic_{i:05d}"
            folder.mkdir()
            save_file(weights, str(folder / "adapter_model.safetensors"))
            (folder / "adapter_config.json").write_text(json.dumps(config))
            save_file({"description": torch.from_numpy(vectors[i, 0]), "centroid": torch.from_numpy(vectors[i, 1])},
                      str(folder / "embeddings.safetensors"))
            card = {**template.__dict__, "name": folder.name, "description": f"synthetic expert {i}",
                    "source_task": "", "metrics": {}}
            (folder / "card.json").write_text(json.dumps(card))
        Library(path).repair()  # index the synthetic experts once
        rss = rss_mb()
        start = time.perf_counter()
        lib = Library(path)
        open_s = time.perf_counter() - start
        start = time.perf_counter()
        n = len(lib.names())
        list_s = time.perf_counter() - start
        lib.search("add two numbers", 5)  # loads the embedder
        start = time.perf_counter()
        hits = lib.search("sort a list of words", 5)
        search_ms = (time.perf_counter() - start) * 1000
        return {"real experts": real, "synthetic experts": synthetic, "experts": n, "open_s": round(open_s, 3),
                "list_s": round(list_s, 3), "search_ms": round(search_ms, 2), "search top-1": hits[0].name,
                "memory growth of open, list and search (MB, the embedder included)": round(rss_mb() - rss, 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cards", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--synthetic", type=int, default=10_000)
    args = parser.parse_args()
    search = search_section(args.cards, args.queries)
    print(search, flush=True)
    opened = open_section(args.synthetic)
    print(opened, flush=True)
    summary = {**{f"search: {k}": v for k, v in search.items()}, **{f"open: {k}": v for k, v in opened.items()},
               "targets": "search p99 < 5 ms, recall@10 >= 0.97"}
    write_results("scale_bench", [search, opened], summary,
                  f"python benchmarks/scale_bench.py --cards {args.cards} --queries {args.queries} "
                  f"--synthetic {args.synthetic}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.4))
    ax.bar(["p50", "p99"], [search["p50_ms"], search["p99_ms"]], color=["tab:blue", "tab:orange"])
    ax.axhline(5, color="grey", ls="--", lw=1)
    ax.set(ylabel="ms per query", title=f"{search['index']} over {args.cards:,} cards: recall@10 {search['recall@10']}")
    fig.tight_layout()
    fig.savefig(RESULTS / "scale_bench.png", dpi=110)


if __name__ == "__main__":
    main()
