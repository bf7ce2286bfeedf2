"""Base-model baselines on held-out dev tasks: zero-shot and 5-shot ICL, via the eval harness.

    python benchmarks/eval_baselines.py [--tasks N] [--n-test 100] [--seed 0]
Each row is what `lorahub-plus eval --task T --method M --shots 5 --n-test 100 --seed 0` prints.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_results  # noqa: E402

from lorahub_plus.library.build import read_task_list
from lorahub_plus.scoring import EvalConfig
from lorahub_plus.evaluation import evaluate
from lorahub_plus.models import load_base_model
from lorahub_plus.paths import resolve_task
from lorahub_plus.tasks import load_task

DEV_TASKS = Path(__file__).resolve().parent / "dev_tasks.txt"


def dev_tasks() -> list[str]:
    """The dev task list in file order."""
    names = read_task_list(DEV_TASKS)
    return [line.strip() for line in DEV_TASKS.read_text().splitlines() if line.strip() in names]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=5, help="first N dev tasks")
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = load_base_model()
    cfg = EvalConfig(shots=5, n_test=args.n_test, seed=args.seed)
    rows = []
    for name in dev_tasks()[: args.tasks]:
        task = load_task(resolve_task(name))
        row = {"task": name}
        for method in ("zero-shot", "icl"):
            r = evaluate(model, tokenizer, task, method, cfg, progress=True)
            row |= {f"{method} acc": r.accuracy, f"{method} in-tok/ex": round(r.input_tokens_per_example, 1),
                    f"{method} s": round(r.wall_s, 1)}
            row["n"] = r.n
        rows.append(row)
        print(row, flush=True)
    summary = {f"mean {m} accuracy": statistics.mean(r[f"{m} acc"] for r in rows) for m in ("zero-shot", "icl")}
    print(write_results("eval_baselines", rows, summary,
                        f"python benchmarks/eval_baselines.py --tasks {args.tasks} --n-test {args.n_test} --seed {args.seed}"))


if __name__ == "__main__":
    main()
