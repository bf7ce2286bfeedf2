"""Building experts serially against as Ray tasks (2 workers of 1 CPU each), on this machine, on the default model.

Each build trains the same experts into a fresh library in a temporary folder: the first `--experts` library
tasks of library/select.json (held-out dev tasks are never among them), with short settings so that the
comparison fits in minutes (`--max-train` examples, 1 epoch, 20 held-out examples scored per expert).

    python benchmarks/build_bench.py [--experts 4] [--max-train 48]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, write_results  # noqa: E402

from lorahub_plus.library.build import Selection, build_library, build_library_ray
from lorahub_plus.library.store import Library
from lorahub_plus.models import load_base_model
from lorahub_plus.paths import REPO_ROOT


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--max-train", type=int, default=48)
    args = parser.parse_args()
    raw = json.loads((REPO_ROOT / "library" / "select.json").read_text())
    tasks = [{"task": t if isinstance(t, str) else t["task"]} for t in raw["tasks"][: args.experts]]
    selection = Selection({**raw["defaults"], "max_train": args.max_train, "epochs": 1, "n_test": 20},
                          [{**t, "name": t["task"].replace(":", "__")} for t in tasks])
    model, _ = load_base_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for how in ("serial", "ray"):
            lib = Library.create(Path(tmp) / how, model)
            start = time.perf_counter()
            if how == "serial":  # one process, torch on both cores
                report = build_library(selection, lib, progress=False)
            else:  # two Ray workers, one core each
                report = build_library_ray(selection, lib, cpus_per_task=1, progress=False)
            seconds = time.perf_counter() - start
            rows.append({"build": how, "experts": sum(r["status"] == "built" for r in report),
                         "seconds": round(seconds, 1), "verified": lib.verify() == [],
                         "mean expert accuracy": round(sum(c.metrics["expert_accuracy"] for c in lib.cards())
                                                       / max(len(lib), 1), 3)})
            print(rows[-1], flush=True)
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    summary = {"experts": args.experts, "speedup (serial / ray)": round(speedup, 2), "target": ">= 1.8x"}
    command = f"python benchmarks/build_bench.py --experts {args.experts} --max-train {args.max_train}"
    notes = ("The Ray time includes starting a local Ray instance and each worker loading the model once. Both "
             "builds train the same experts with the same settings; accuracies may differ in the last digit "
             "because one torch thread and two sum in different orders.")
    write_results("build_bench", rows, summary, command, notes)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.4))
    ax.barh([r["build"] for r in rows], [r["seconds"] for r in rows], color=["grey", "tab:blue"])
    ax.set(xlabel=f"seconds to build {args.experts} experts", title=f"Ray build: {speedup:.2f}x the serial build")
    fig.tight_layout()
    fig.savefig(RESULTS / "build_bench.png", dpi=110)


if __name__ == "__main__":
    main()
