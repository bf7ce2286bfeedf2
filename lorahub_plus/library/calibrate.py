"""Thresholds that compose reads from the library, computed from the library's own held-out data.

`close`: the best retrieval score from which compose counts a candidate as close (a sibling task), and tests
it against the base model on the shots rather than by leave-one-out. Each expert's task plays a new task
once: its description and a few of its held-out inputs are scored against every expert of another family
(`tasks.family`: the BIG-bench parent task, or a natural_instructions subtask's dataset), the way compose scores a user's task. A new task with no sibling in the
library reaches about as high as these do; `close` is just above the highest of them (`QUANTILE` 1.0, rounded up).
"""
from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from lorahub_plus.errors import TaskFormatError
from lorahub_plus.library.store import Library
from lorahub_plus.paths import resolve_task
from lorahub_plus.tasks import expert_split, family, load_task

QUANTILE = 1.0
SHOTS = 5  # held-out inputs per task: what a user gives compose


def calibrate_close(library: Library, progress: bool = True) -> dict:
    """Compute `close` (stored as the library's calibration `close`, with its evidence) and return the entry."""
    rows = []
    names = library.names()
    cards = {n: library.card(n) for n in names}
    families = {n: family(c.source_task or n) for n, c in cards.items()}
    for name in tqdm(names, desc="calibrating close", disable=not progress, leave=False):
        card = cards[name]
        split = card.metrics.get("split_seed"), card.metrics.get("n_test")
        if not card.source_task or not all(isinstance(x, int) for x in split):
            continue  # no task of its own (a synthesized or hub adapter)
        try:
            task = load_task(resolve_task(card.source_task))
        except TaskFormatError:
            continue  # its task file is not here
        test = expert_split(task, split[1], split[0])[1][:SHOTS]
        others = [n for n in names if families[n] != families[name]]
        if len(test) < 2 or not others:
            continue
        scores = library.scores(task.description or task.name, [task.routing_text(ex) for ex in test], others)
        best = max(scores, key=scores.get)
        rows.append((name, best, scores[best]))
    if len(rows) < 5:
        raise ValueError(f"{library.path}: only {len(rows)} experts have a task file here to calibrate on; "
                         "`close` needs at least 5 (set the task folder with $LORAHUB_PLUS_DATA)")
    best_scores = np.array([s for *_, s in rows])
    value = math.ceil(float(np.quantile(best_scores, QUANTILE)) * 100) / 100
    evidence = {"rule": f"the {QUANTILE:.0%} quantile, rounded up to 0.01, of each expert's task's best retrieval score "
                        f"against the experts of other families ({SHOTS} held-out inputs and its description)",
                "tasks": len(rows), "quantiles": {str(q): round(float(np.quantile(best_scores, q)), 4)
                                                  for q in (0.5, 0.75, 0.9, 1.0)},
                "highest": sorted(([n, o, round(s, 4)] for n, o, s in rows), key=lambda r: -r[2])[:5]}
    library.set_calibration("close", value, evidence)
    return library.calibration("close")
