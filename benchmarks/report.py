"""Write a benchmark's results as JSON and as a Markdown table under benchmarks/results/."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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


def median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
