"""Extend library/select.json with N more BIG-bench tasks (issue 36): the selection of the 200-expert library.

A task qualifies when it is not a dev task, not of the family of a new-task dev task (those stay without
neighbours), has >= 30 examples, prompts (task prefix and input) <= 500 characters on average and, if generative, targets of <= 3
words for 90% of its examples (so that exact match can score them). Tasks are drawn one family at a time
in a seeded order (round-robin over families, so no family floods the library). The first KINDS * 5 new
tasks are trained as other kinds of adapter, so the shipped library mixes ranks, modules and rsLoRA.

    python scripts/extend_selection.py --add 145 --out library/select-200.json
"""
from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

from lorahub_plus.tasks import family
from lorahub_plus.paths import data_dir

ROOT = Path(__file__).resolve().parents[1]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = [{"rank": 4, "alpha": 8},
         {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
         {"rank": 8, "alpha": 8, "rslora": True},
         {"rank": 4, "alpha": 8, "target_modules": ALL_LINEAR},
         {"rank": 16, "alpha": 16, "rslora": True, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}]
PER_KIND = 5
STEPS_BUDGET = 400  # example passes: a small task trains more epochs, up to 10


def qualifies(task: dict) -> bool:
    examples, prefix = task["examples"], len(task.get("task_prefix") or "")
    if len(examples) < 30 or prefix + sum(len(e["input"]) for e in examples) / len(examples) > 500:
        return False
    return task["kind"] != "generative" or sum(len(e["target"].split()) <= 3 for e in examples) >= 0.9 * len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add", type=int, default=145)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    selection = json.loads((ROOT / "library" / "select.json").read_text())
    dev = [line.split("#")[0].strip() for line in (ROOT / "benchmarks" / "dev_tasks.txt").read_text().splitlines()
           if line.split("#")[0].strip()]
    far_families = {family(t) for t in dev[12:]}  # the new-task dev tasks: their families stay out
    chosen = {(t if isinstance(t, str) else t["task"]).replace(":", "__") for t in selection["tasks"]}
    by_family = defaultdict(list)
    for path in sorted(data_dir().glob("*.json")):
        name = path.stem
        if name in chosen or name in dev or family(name) in far_families:
            continue
        task = json.loads(path.read_text())
        if qualifies(task):
            by_family[family(name)].append((name, len(task["examples"])))
    rng = random.Random(args.seed)
    families = sorted(by_family)
    rng.shuffle(families)
    for f in families:
        rng.shuffle(by_family[f])
    drawn = []
    while len(drawn) < args.add and any(by_family.values()):
        for f in families:
            if by_family[f] and len(drawn) < args.add:
                drawn.append(by_family[f].pop())
    entries = []
    for i, (name, n) in enumerate(drawn):
        n_train = min(200, n - min(50, n // 3))
        entry = {"task": name}
        if n_train < STEPS_BUDGET // 2:
            entry["epochs"] = min(10, -(-STEPS_BUDGET // n_train))
        if i < len(KINDS) * PER_KIND:
            entry.update(KINDS[i % len(KINDS)])
        entries.append(entry)
    qualifying = sum(len(v) for v in by_family.values()) + len(drawn)
    selection["_comment"] = (selection["_comment"] + f" Tasks after the first {len(selection['tasks'])}: drawn by "
                             f"scripts/extend_selection.py --add {args.add} --seed {args.seed} from {qualifying} "
                             f"qualifying tasks in {len(families)} families.")
    selection["tasks"] = selection["tasks"] + entries
    args.out.write_text(json.dumps(selection, indent=1) + "\n")
    print(f"{len(entries)} tasks added from {qualifying} qualifying in {len(families)} families -> {args.out}")


if __name__ == "__main__":
    main()
