"""Write a benchmark's results as JSON and as a Markdown table under benchmarks/results/."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def hypernet_id(library) -> dict:
    """The library's hypernetwork as rows record it: its weights' hash and how it was trained. Columns that use it
    keep only its rows (`made_by`), so retraining it never mixes its rows with an earlier one's."""
    from lorahub_plus.hypernet.network import HYPERNET_DIR, HYPERNET_WEIGHTS, read_hypernet_meta
    from lorahub_plus.library.readers import sha256_file

    t = read_hypernet_meta(library)["train_config"]
    steps = {"reconstruction": f"{t['recon_steps']} reconstruction", "sft": f"{t['sft_steps']} SFT"}
    phases = [steps[p] for p in ("reconstruction", "sft") if t["objective"] in (p, "both")]
    return {"hypernet": sha256_file(library.path / HYPERNET_DIR / HYPERNET_WEIGHTS)[:12],
            "hypernet_training": " + ".join(phases) + f" steps; anchor: {t.get('anchor') or 'the experts mean'}"}


def made_by(rows: list[dict], methods, net: dict) -> list[dict]:
    """`rows`, less those of the `methods` that use the hypernetwork and that another hypernetwork made."""
    return [r for r in rows if r.get("method") not in methods or r.get("hypernet") == net["hypernet"]]


def write_results(name: str, rows: list[dict], summary: dict, command: str, notes: str = "") -> Path:
    RESULTS.mkdir(exist_ok=True)
    meta = {"benchmark": name, "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, no GPU"}
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    columns = list(rows[0]) if rows else []
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# {name}", "", f"`{command}` ({meta['date']}, {meta['machine']})", ""]
    lines += [f"- **{k}**: {fmt(v)}" for k, v in summary.items()] + [""]
    if notes:
        lines += [notes, ""]
    if rows:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def elapsed(fn) -> float:
    """Seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call."""
    fn()
    return statistics.median(elapsed(fn) for _ in range(repeats))


def calibrate(units: dict[str, tuple[list, list, list]]) -> dict:
    """The fallback threshold on a retrieval score: below it a unit (an example, or a whole task) takes the
    synthesized adapter's result instead of the one without. `units` maps each task to (scores, correct or
    accuracy with the fallback, without), one entry per unit. The threshold maximizes the mean over tasks
    of the per-task mean (ties: the lower threshold, fewer fallbacks). Also the leave-one-task-out mean: each
    task scored at the threshold chosen on the others, an estimate that is not tuned on the task itself.
    `adopted` is the threshold to ship: the chosen one only when leave-one-task-out beats never falling back,
    else None (no fallback): an in-sample gain alone is overfitting."""
    import numpy as np

    tasks = list(units)
    arrays = {t: tuple(np.asarray(v, dtype=float) for v in units[t]) for t in tasks}
    cuts = np.unique(np.concatenate([[0.0], *(a[0] + 1e-6 for a in arrays.values())]))
    per_task = np.stack([np.where(s[None] < cuts[:, None], w[None], wo[None]).mean(1)
                         for s, w, wo in arrays.values()], 1)  # (cuts, tasks)

    def best(columns) -> int:
        means = per_task[:, columns].mean(1).round(9)
        return int(np.flatnonzero(means == means.max())[0])  # cuts ascend: the first is the lowest

    chosen = best(list(range(len(tasks))))
    loo = [per_task[best([j for j in range(len(tasks)) if j != i]), i] for i in range(len(tasks))]
    loo_mean = float(np.mean(loo))
    return {"threshold": float(cuts[chosen]), "adopted": float(cuts[chosen]) if loo_mean > per_task[0].mean() else None,
            "tasks": len(tasks), "mean, in-sample": float(per_task[chosen].mean()),
            "mean, leave-one-task-out": loo_mean, "never": float(per_task[0].mean()),
            "always": float(np.mean([w.mean() for _, w, _ in arrays.values()])),
            "units below it": int(sum((s < cuts[chosen]).sum() for s, _, _ in arrays.values())),
            "units": int(sum(len(s) for s, _, _ in arrays.values()))}


def barh(labels: list[str], values: list[float], xlabel: str, path: Path, xlim: tuple | None = None) -> None:
    """One horizontal bar per label: the plot of a small benchmark table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1))
    ax.barh(range(len(labels)), values)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel=xlabel, **({"xlim": xlim} if xlim else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

