"""The server under load, on loopback (issue 35): 16 concurrent clients send 200 streamed chat requests, each
naming one of 16 experts, against the same load on the base model alone, on `auto` routing, and the mixed
requests sent one at a time. Every request decodes `--max-tokens` tokens (`ignore_eos`), so the loads match.
    python benchmarks/serve_bench.py [--requests 200] [--clients 16] [--max-tokens 16]
"""
from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, write_results  # noqa: E402

from lorahub_plus import Hub
from lorahub_plus.paths import REPO_ROOT

QUESTIONS = ["What is 47 plus 38?", "Is this review positive? 'Great value, works well.'", "Spell 'house' backwards.",
             "What is the past tense of swim?", "Name the color #FF0000.", "Is a whale a fish?",
             "Convert 3 km to meters.", "Which is heavier, a kilo of iron or a kilo of feathers?"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(library: Path, max_batch: int):
    import uvicorn

    from lorahub_plus.serving.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(Hub(library), max_batch=max_batch, max_waiting=512)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, app.state.server


def one(url: str, model: str, question: str, max_tokens: int) -> dict:
    start, first, tokens = time.perf_counter(), None, 0
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return {"error": r.status_code}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if first is None and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"error": type(e).__name__}
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


def load(url: str, models: list[str], n: int, clients: int, max_tokens: int, memory: list) -> dict:
    jobs = [(models[i % len(models)], QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    results, start = [], time.perf_counter()

    def run(job):
        out = one(url, *job, max_tokens)
        results.append(out)
        if len(results) == 50:
            memory.append(rss_mb())
        return out

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, jobs))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    lat, ttft = sorted(r["latency"] for r in ok), sorted(r["ttft"] for r in ok)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"requests": n, "clients": clients, "errors": n - len(ok), "tokens": sum(r["tokens"] for r in ok),
            "wall_s": round(wall, 2), "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "p50_latency_s": round(pct(lat, 0.5), 3), "p99_latency_s": round(pct(lat, 0.99), 3),
            "p50_ttft_s": round(pct(ttft, 0.5), 3), "p99_ttft_s": round(pct(ttft, 0.99), 3),
            "rss_after_50_mb": round(memory[-1], 1) if memory else None, "rss_end_mb": round(rss_mb(), 1)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    names = [r["load"] for r in rows]
    a.barh(names, [r["tokens_per_s"] for r in rows])
    a.set(xlabel="decoded tokens / s")
    b.barh(names, [r["p50_latency_s"] for r in rows], label="p50")
    b.barh(names, [r["p99_latency_s"] - r["p50_latency_s"] for r in rows], left=[r["p50_latency_s"] for r in rows],
           label="p99", alpha=0.5)
    b.set(xlabel="latency (s)")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--library", type=Path, default=REPO_ROOT / "library")
    args = parser.parse_args()
    url, uv, server = start(args.library, args.clients)
    experts = server.names[: 16]
    one(url, experts[0], QUESTIONS[0], 2)  # warm-up
    rows = []
    for name, models, clients in (("16 experts, 16 clients", experts, args.clients),
                                  ("base model, 16 clients", [server.base_id], args.clients),
                                  ("auto routing, 16 clients", ["auto"], args.clients),
                                  ("arrow and gate per token, 16 clients", ["route:arrow", "route:gate"], args.clients),
                                  ("16 experts, one at a time", experts, 1)):
        memory: list = []
        steps, rows_decoded = server.engine.steps, server.engine.batched_rows
        row = {"load": name, **load(url, models, args.requests, clients, args.max_tokens, memory)}
        row["mean_batch"] = round((server.engine.batched_rows - rows_decoded) / max(1, server.engine.steps - steps), 1)
        rows.append(row)
        print(row, flush=True)
    uv.should_exit = True
    by = {r["load"]: r for r in rows}
    mixed, base = by["16 experts, 16 clients"], by["base model, 16 clients"]
    summary = {
        "mixed / base throughput (target >= 0.8)": round(mixed["tokens_per_s"] / base["tokens_per_s"], 3),
        "mixed / one at a time (target >= 4)": round(mixed["tokens_per_s"] / by["16 experts, one at a time"]["tokens_per_s"], 2),
        "auto / base throughput (target >= 0.85)": round(by["auto routing, 16 clients"]["tokens_per_s"] / base["tokens_per_s"], 3),
        "errors": sum(r["errors"] for r in rows),
        "RSS growth after a load's first 50 requests (MB, largest; target: flat)": max(
            round(r["rss_end_mb"] - r["rss_after_50_mb"], 1) for r in rows),
        "peak RSS (MB)": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    plot(rows, RESULTS / "serve_bench.png")
    print(write_results("serve_bench", rows, summary, "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:]),
                        notes="Server and clients in one process on loopback; the engine decodes up to 16 requests "
                              "together, each row routed its own way. `mean_batch`: rows per decoding step."))


if __name__ == "__main__":
    main()
