"""Where the time goes when `route --router arrow` gets one long input among short ones (issue 33, item 7):
six plain questions and one text of about 11,000 tokens (BIG-bench inputs run together; the model keeps the
last 8,128 that fit its context). Each step timed once, greedy, 16 new tokens.
    python benchmarks/long_input_bench.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, barh, write_results  # noqa: E402

from lorahub_plus.encode import length_batches
from lorahub_plus.library.store import Library
from lorahub_plus.models import load_base_model
from lorahub_plus.paths import REPO_ROOT, data_dir
from lorahub_plus.routing.routers import Router, RouterConfig
from lorahub_plus.tasks import load_task

SHORT = ["What is 47 plus 38?", "Is the Pacific the largest ocean?", "Translate 'good morning' to French.",
         "What is the past tense of run?", "Name a prime number above 20.", "What color is the sky at noon?"]
NEW = 16


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 1)


def main():
    model, tokenizer = load_base_model()
    texts = [ex.input for ex in load_task(data_dir() / "abstract_narrative_understanding__4_distractors.json").examples]
    long, i = "", 0
    while len(tokenizer(long, add_special_tokens=False)["input_ids"]) < 11_000:
        long, i = long + texts[i % len(texts)] + "\n", i + 1
    inputs = SHORT + [long]
    lengths = [len(ids) for ids in tokenizer(inputs, add_special_tokens=False)["input_ids"]]
    router = Router(Library(REPO_ROOT / "library"), model, tokenizer, RouterConfig(router="arrow", fallback="never"))
    rows = [
        {"step": "arrow: explain, 7 inputs (one forward each)", "seconds": timed(lambda: router.explain(inputs))},
        {"step": "arrow: generate, the long input alone", "seconds": timed(lambda: router.generate([long], NEW))},
        {"step": "base model: generate, the long input alone", "seconds": timed(
            lambda: router.generate([long], NEW, adapters=["none"]))},
        {"step": "arrow: generate, the 6 short inputs", "seconds": timed(lambda: router.generate(SHORT, NEW))},
        {"step": "arrow: generate, all 7 in one batch (before: padded to the long one)",
         "seconds": timed(lambda: router.generate(inputs, NEW))},
    ]
    router.remove()
    batches = length_batches(lengths, 16, 4096)
    by_budget = rows[1]["seconds"] + rows[3]["seconds"]
    summary = {"input tokens": lengths, "batches by the 4,096-token budget": batches,
               "route, 7 inputs, before (one padded batch + explain)": rows[0]["seconds"] + rows[4]["seconds"],
               "route, 7 inputs, after (batched by tokens + explain)": rows[0]["seconds"] + by_budget,
               "arrow over base on the long input": round(rows[1]["seconds"] / rows[2]["seconds"], 2)}
    barh([r["step"] for r in rows], [r["seconds"] for r in rows], "seconds (2-core CPU)",
         RESULTS / "long_input_bench.png")
    print(write_results("long_input_bench", rows, summary, "python benchmarks/long_input_bench.py"))


if __name__ == "__main__":
    main()
