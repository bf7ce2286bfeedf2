"""Do rerun rows match the recorded ones? Per (task, shot seed, regime, method) in the rerun file: the accuracy
and what the method decided (its notes) against results/compose_bench.rows.jsonl.

    python benchmarks/compare_rows.py RERUN.jsonl [--name reproduce_check]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose_bench import read_rows, row_key  # noqa: E402
from report import RESULTS, write_results  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rerun", type=Path)
    parser.add_argument("--name", default="reproduce_check")
    parser.add_argument("--why", default="after the move to a layout by capability (issue 34)")
    args = parser.parse_args()
    recorded = {row_key(r): r for r in read_rows(RESULTS / "compose_bench.rows.jsonl")}
    rows = []
    for new in read_rows(args.rerun):
        old = recorded.get(row_key(new))
        if old is None:
            continue
        rows.append({"task": new["task"], "seed": new["seed"], "regime": new["regime"], "method": new["method"],
                     "recorded": old["accuracy"], "rerun": new["accuracy"],
                     "same accuracy": old["accuracy"] == new["accuracy"],
                     "same decision": {k: v for k, v in old.get("notes", {}).items() if k != "best_score"}
                     == {k: v for k, v in new.get("notes", {}).items() if k != "best_score"}})
    same = sum(r["same accuracy"] and r["same decision"] for r in rows)
    summary = {"rows compared": len(rows), "identical": same,
               "mean recorded": round(sum(r["recorded"] for r in rows) / max(len(rows), 1), 4),
               "mean rerun": round(sum(r["rerun"] for r in rows) / max(len(rows), 1), 4)}
    write_results(args.name, rows, summary, f"python benchmarks/compare_rows.py {args.rerun}",
                  f"The recorded compose rows rerun {args.why}.")
    print(summary)


if __name__ == "__main__":
    main()
