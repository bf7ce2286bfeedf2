"""The hypernetwork (Text-to-LoRA) on held-out dev tasks, against the base model, the top expert by
description, the multi-task LoRA, compose with and without a synthesized candidate, and the oracle; plus
sensitivity to the description's wording, synthesis time, reconstruction error and training cost.

    python benchmarks/hypernet_bench.py [--tasks 12] [--first 12] [--methods ...] [--calibrate]

Each task's test set is split seed 0, 50 examples; shot seed 0, 5 shots (as compose_bench). Every
library-based column sees the far regime of compose_bench (no expert of the task's family or close to
it) and never the `multitask` expert, so compose with and without the synthesized candidate differ in
that candidate only. Rows already measured by compose_bench with the same settings (zero-shot, compose
= its far `best-single +base`, the base test on the shots, pinned here too; oracle) are taken from its
rows file and marked so. Rows append to results/hypernet_bench.rows.jsonl as they finish, method by
method, so a rerun resumes.
--calibrate stores, with the library's hypernetwork, the fallback threshold on the best retrieval score
that maximizes the mean accuracy of "compose, with the synthesized candidate below the threshold".
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose_bench import far_exclusions, read_rows, row_key  # noqa: E402
from eval_baselines import dev_tasks  # noqa: E402
from report import RESULTS, calibrate, hypernet_id, made_by, median_time, write_results  # noqa: E402

from lorahub_plus.compose.config import ComposeConfig, Variant
from lorahub_plus.compose.composer import select_candidates
from lorahub_plus.scoring import EvalConfig
from lorahub_plus.evaluation import eval_split, evaluate
from lorahub_plus.hypernet.network import HYPERNET_CONFIG, HYPERNET_DIR
from lorahub_plus.library.store import Library
from lorahub_plus.models import load_base_model
from lorahub_plus.paths import REPO_ROOT, resolve_task
from lorahub_plus.hypernet.synthesize import set_fallback_threshold, synthesize
from lorahub_plus.tasks import load_task
from lorahub_plus.library.train import MULTITASK

WORDINGS = json.loads((Path(__file__).resolve().parent / "dev_descriptions.json").read_text())
METHODS = ["zero-shot", "top-1 by description", "hypernet", "hypernet (5 examples)", "multitask",
           "compose", "compose +synthesized", "oracle", "hypernet wording 1", "hypernet wording 2",
           "hypernet wording 3"]
USES_HYPERNET = [m for m in METHODS if m.startswith("hypernet") or m == "compose +synthesized"]
"""Columns that use the library's hypernetwork: their rows record which one (`hypernet_id`)."""
BORROWED = {"zero-shot": ("near", "zero-shot"), "compose": ("far", "best-single +base"), "oracle": ("near", "oracle")}
"""Columns compose_bench measured with the same settings: (its regime, its method name)."""


def run(model, tokenizer, library: Library, task_name: str, name: str, n_test: int) -> dict:
    task = load_task(resolve_task(task_name))
    cfg = EvalConfig(shots=5, n_test=n_test, seed=0, shot_seed=0)
    exclude = [*far_exclusions(library, task_name), MULTITASK]
    options, method = {}, name
    if name == "top-1 by description":
        top = next(h.name for h in library.search(task.description or task.name, len(library)) if h.name not in exclude)
        method, options = "adapter", {"adapter": library.expert_path(top)}
    elif name.startswith("hypernet"):
        method = "hypernet-fewshot" if "examples" in name else "hypernet"
        options = {"library": library}
        if "wording" in name:
            options["description"] = WORDINGS[task_name][int(name[-1]) - 1]
    elif name == "multitask":
        options = {"library": library}
    elif name.startswith("compose"):
        method = "compose"
        options = {"library": library, "exclude": exclude, "compose_cfg": ComposeConfig(
            fallback="always" if "synthesized" in name else "never"), "variant": Variant(base_test="shots")}
    r = evaluate(model, tokenizer, task, method, cfg, **options)
    return {"task": task_name, "seed": 0, "regime": "far", "method": name, "accuracy": r.accuracy, "n": r.n,
            "adapt_s": r.adapt_s, "source": "hypernet_bench", **({"expert": options["adapter"].name}
                                                                  if method == "adapter" else {})}


def best_score(library: Library, task_name: str) -> float:
    """The best retrieval score compose sees (description and 5 shots' inputs, far regime, no multitask)."""
    task = load_task(resolve_task(task_name))
    shots = eval_split(task, EvalConfig(shots=5, n_test=50, seed=0, shot_seed=0))[0][:5]
    chosen = select_candidates(library, ComposeConfig(), task.description, [task.routing_text(ex) for ex in shots],
                               exclude=[*far_exclusions(library, task_name), MULTITASK])
    return max(s for _, s in chosen)


COLD = """import sys, tempfile, time
from pathlib import Path
from lorahub_plus.library import Library
from lorahub_plus.hypernet.synthesize import synthesize
library = Library(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    synthesize("Add two numbers.", None, Path(tmp) / "s", library)
    print(time.perf_counter() - start)"""


def cold_seconds(library: Library) -> float:
    """Seconds of a fresh process's first synthesis, after importing lorahub_plus: the embedder (and the
    sentence-transformers import it needs) loads on first use, which a one-off `synthesize` pays."""
    out = subprocess.run([sys.executable, "-c", COLD, str(library.path)], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=12, help="how many dev tasks, from --first")
    parser.add_argument("--first", type=int, default=12, help="index of the first dev task (12: those with no family)")
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--calibrate", action="store_true", help="store the fallback threshold with the hypernetwork")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    library = Library(REPO_ROOT / "library")
    tasks = dev_tasks()[args.first: args.first + args.tasks]
    rows_file = RESULTS / "hypernet_bench.rows.jsonl"
    net = hypernet_id(library)
    borrowed = {row_key(r): r for r in read_rows(RESULTS / "compose_bench.rows.jsonl")}
    if not args.report_only:
        model, tokenizer = load_base_model()
        for name in args.methods:  # method by method: an interrupted run leaves whole columns
            for task_name in tasks:
                seen = {(r["task"], r["method"]) for r in made_by(read_rows(rows_file), USES_HYPERNET, net)}
                if (task_name, name) in seen:
                    continue
                source = BORROWED.get(name)
                found = borrowed.get((task_name, 0, *source)) if source else None
                row = ({**found, "method": name, "source": f"compose_bench {source[1]} ({source[0]})"} if found else
                       None if name == "oracle" else run(model, tokenizer, library, task_name, name, args.n_test))
                if row is None:
                    continue  # an oracle trains a LoRA per task: only compose_bench's are used here
                row.update(net if name in USES_HYPERNET else {})
                with rows_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(row, flush=True)
    all_rows = read_rows(rows_file)
    rows = {(r["task"], r["method"]): r for r in made_by(all_rows, USES_HYPERNET, net)}
    scores = {t: best_score(library, t) for t in tasks}
    table, columns = [], [m for m in METHODS if any((t, m) in rows for t in tasks)]
    for t in tasks:
        table.append({"task": t, "best retrieval score": round(scores[t], 3),
                      **{m: rows[t, m]["accuracy"] if (t, m) in rows else "-" for m in columns}})
    summary = {}
    for m in columns:
        done = [t for t in tasks if (t, m) in rows]
        zero = [t for t in done if (t, "zero-shot") in rows]
        summary[m] = {"tasks": len(done), "mean accuracy": round(statistics.mean(rows[t, m]["accuracy"] for t in done), 4),
                      "mean zero-shot on the same tasks": round(statistics.mean(rows[t, "zero-shot"]["accuracy"]
                                                                                for t in zero), 4) if zero else None}
    pair = [t for t in tasks if (t, "compose") in rows and (t, "compose +synthesized") in rows]
    meta = json.loads((library.path / HYPERNET_DIR / HYPERNET_CONFIG).read_text())
    fallback = calibrate({t: ([scores[t]], [rows[t, "compose +synthesized"]["accuracy"]], [rows[t, "compose"]["accuracy"]])
                          for t in pair}) if pair else {}
    if fallback:
        below = [t for t in pair if scores[t] < fallback["threshold"]]
        fallback["below threshold: compose +synthesized"] = statistics.mean(
            rows[t, "compose +synthesized"]["accuracy"] for t in below) if below else None
        fallback["below threshold: compose"] = statistics.mean(rows[t, "compose"]["accuracy"] for t in below) \
            if below else None
        if args.calibrate:
            set_fallback_threshold(library, fallback["adopted"], {**fallback, "calibrated_on": pair,
                                                                    "by": "benchmarks/hypernet_bench.py --calibrate"})
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(1000))
        seconds = median_time(lambda: synthesize("Add two numbers.", None, Path(tmp) / f"s{next(counter)}", library), 5)
    cost = {"synthesis seconds (median of 5, PEFT folder written)": round(seconds, 3),
            "synthesis seconds, first call in a fresh process (median of 3; imports and loads the embedder)":
                round(statistics.median(cold_seconds(library) for _ in range(3)), 3),
            "reconstruction error (relative, B A, training experts)": meta["metrics"]["reconstruction_error"],
            "training seconds": meta["metrics"]["train_seconds"], "training tasks": meta["metrics"]["n_training_tasks"],
            "training steps": {k: len(v) for k, v in meta["losses"].items()}}
    by_net = {}
    for r in all_rows:
        if r["method"] in USES_HYPERNET and r["task"] in tasks:
            by_net.setdefault((r["hypernet"], r["hypernet_training"]), {}).setdefault(r["method"], []).append(r["accuracy"])
    measured = [{"id": h, "training": training, **{m: f"{statistics.mean(a):.3f} ({len(a)} tasks)"
                                                          for m, a in by_method.items()}}
               for (h, training), by_method in by_net.items()]
    plot(summary, RESULTS / "hypernet_bench.png")
    notes = ("Columns: " + "; ".join(f"`{m}`: {summary[m]['tasks']} tasks" for m in columns) +
             ".\n\nPer method: " + json.dumps(summary, indent=1) + "\n\nFallback: " + json.dumps(fallback, indent=1) +
             "\n\nCost: " + json.dumps(cost, indent=1) + "\n\nRows marked `compose_bench` in the rows file come from "
             "compose_bench's rows (same split, shots and settings).\n\nEvery hypernetwork measured here (the "
             f"columns above use the library's, {net['hypernet']}): " + json.dumps(measured, indent=1))
    print(write_results("hypernet_bench", table, {**{f"{m} (mean)": summary[m]["mean accuracy"] for m in columns},
                                                  **{f"fallback {k}": v for k, v in fallback.items()}, **cost},
                        f"python benchmarks/hypernet_bench.py --first {args.first} --tasks {args.tasks} "
                        f"--n-test {args.n_test}" + (" --calibrate" if args.calibrate else ""), notes))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(summary)
    ax.barh(names, [summary[m]["mean accuracy"] for m in names], color="tab:blue")
    for i, m in enumerate(names):
        ax.text(summary[m]["mean accuracy"], i, f" {summary[m]['mean accuracy']:.3f} ({summary[m]['tasks']} tasks)",
                va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="mean accuracy over held-out dev tasks", title="hypernetwork (Text-to-LoRA) vs baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
