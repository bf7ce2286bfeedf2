"""How a file of plain examples (input, target, choices; no prefixes, as a user's JSONL) should be framed for
the model: BIG-bench's `Q:`/`A:` defaults or the base model's chat template. Each dev task is read as such a
file and scored zero-shot and routed (retrieval over the library), framed both ways, on the same test split.
    python benchmarks/framing_bench.py [--n-test 30]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_baselines import dev_tasks  # noqa: E402
from report import RESULTS, barh, write_results  # noqa: E402

from lorahub_plus.scoring import EvalConfig
from lorahub_plus.evaluation import evaluate
from lorahub_plus.library.store import Library
from lorahub_plus.models import load_base_model
from lorahub_plus.paths import REPO_ROOT, resolve_task
from lorahub_plus.tasks import Task, load_task

ROWS = RESULTS / "framing_bench.rows.jsonl"
FRAMINGS = ("Q/A", "chat")
METHODS = ("zero-shot", "route-retrieval")


def as_user_file(task: Task, framing: str) -> Task:
    """The task as a JSONL file of its examples would load (no prefixes of its own), framed one way."""
    plain = replace(task, task_prefix="", input_prefix=Task.input_prefix, output_prefix=Task.output_prefix,
                    choice_prefix=Task.choice_prefix, append_choices_to_input=True, plain=True)
    return plain if framing == "chat" else replace(plain, plain=False)  # not plain: the Q/A defaults stay


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-test", type=int, default=30)
    args = parser.parse_args()
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.is_file() else []
    done = {(r["task"], r["framing"], r["method"]) for r in rows}
    model, tokenizer = load_base_model()
    library = Library(REPO_ROOT / "library")
    cfg = EvalConfig(n_test=args.n_test, shots=5, seed=0)
    for name in dev_tasks():
        task = load_task(resolve_task(name))
        for framing in FRAMINGS:
            for method in METHODS:
                if (name, framing, method) in done:
                    continue
                result = evaluate(model, tokenizer, as_user_file(task, framing), method, cfg,
                                  library=library if method != "zero-shot" else None)
                row = {"task": name, "kind": task.kind, "framing": framing, "method": method,
                       "accuracy": result.accuracy, "n": result.n}
                rows.append(row)
                with ROWS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(row, flush=True)
    summary = {}
    for kind in ("multiple_choice", "generative", None):
        for method in METHODS:
            for framing in FRAMINGS:
                acc = [r["accuracy"] for r in rows if r["method"] == method and r["framing"] == framing
                       and kind in (None, r["kind"])]
                if acc:
                    summary[f"{method}, {framing}, {kind or 'all'} ({len(acc)} tasks)"] = sum(acc) / len(acc)
    keys = [k for k in summary if ", all " in k]
    barh(keys, [summary[k] for k in keys], "mean accuracy over the dev tasks read as plain files",
         RESULTS / "framing_bench.png")
    print(write_results("framing_bench", rows, summary, f"python benchmarks/framing_bench.py --n-test {args.n_test}"))


if __name__ == "__main__":
    main()
