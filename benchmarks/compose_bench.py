"""Few-shot composition on held-out dev tasks, in two regimes: every method, several shot seeds, 5 shots;
plus the cost of one objective evaluation (fused module, plain forward, LoraHub-style merge-and-copy).

    python benchmarks/compose_bench.py [--tasks 10] [--seeds 3] [--n-test 50] [--regimes near far] [--timing]
Regimes: `near` composes from the whole library; `far` first removes every expert of the task's BIG-bench
family and every expert whose card description (cosine >= FAR_DESCRIPTION) or input centroid
(cosine >= FAR_CENTROID) lies close to the task's own, so that the task looks new. Rows are appended to
results/compose_bench.rows.jsonl as they finish, so a rerun resumes, and processes given different
--shard values can run side by side. Rows are run seed by seed, so an interrupted run covers every task.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import fields, replace
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_baselines import dev_tasks  # noqa: E402
from report import RESULTS, median_time, write_results  # noqa: E402

from lorahub_plus.compose.config import ComposeConfig, Variant
from lorahub_plus.compose.composer import compose, select_candidates
from lorahub_plus.compose.objective import FewShotObjective
from lorahub_plus.library.stack import load_stack
from lorahub_plus.hypernet.training import trained_on
from lorahub_plus.encode import answer_forward, collate, encode_pair
from lorahub_plus.scoring import EvalConfig
from lorahub_plus.evaluation import evaluate, method_options
from lorahub_plus.routed import RoutedModel
from lorahub_plus.library.store import Library
from lorahub_plus.models import load_base_model
from lorahub_plus.paths import REPO_ROOT, resolve_task
from lorahub_plus.tasks import load_task, split_examples

FAR_DESCRIPTION, FAR_CENTROID = 0.5, 0.7
"""Far-regime thresholds: about the largest similarity that the 12 dev tasks with no family in the library
have to any expert (description 0.26-0.53, centroid 0.19-0.79), so a far task's pool looks like theirs."""

SHOTS_TEST = "best-single +base"  # best-single's pick tested against the base model on the shots
LOO = "best-single +base, loo"  # ... by leave-one-shot-out
AUTO = "best-single +base, auto"  # ... by leave-one-shot-out when no candidate is close, else on the shots
AUTO_SE = "best-single +base, auto, 1-SE"  # ... the expert must win leave-one-out by more than one standard error
GENERALISTS = AUTO_SE + ", +multitask +synthesized"  # ... the multitask LoRA and a synthesized adapter always candidates
PRIOR = AUTO_SE + ", prior"  # ... ties within one standard error go to the best retrieved expert
OLD_DEFAULT = {"include_base": False, "objective": "tokens"}  # what compose did before issue 10
_AUTO = {"optimizer": "best-single", "base_test": "auto"}  # AUTO and AUTO_SE differ in loo_se only; `close`: the
# library's calibration (0.61 tuned on dev tasks when those rows were recorded, 0.63 from `library calibrate`: no
# recorded task's best retrieval score lies between them, so no row changes)
# name -> (evaluation method, overrides for method `compose`: ComposeConfig's and Variant's keys, `split_overrides`)
METHODS = {
    "zero-shot": ("zero-shot", None), "icl": ("icl", None), "uniform": ("uniform", None),
    "best-single": ("best-single", None), "lorahub": ("lorahub", None),
    "compose cmaes/lorahub": ("compose", {"optimizer": "cmaes", "merge": "lorahub", **OLD_DEFAULT}),
    "compose cmaes/mixture": ("compose", {"optimizer": "cmaes", "merge": "mixture", **OLD_DEFAULT}),
    "compose gradient/mixture": ("compose", {"optimizer": "gradient", "merge": "mixture", **OLD_DEFAULT}),
    "oracle": ("oracle", None),
    # issue 10: the base model as a candidate, choice-level selection, fitting over the top few
    SHOTS_TEST: ("compose", {"optimizer": "best-single", "objective": "auto", "base_test": "shots"}),
    "best-single +base tokens": ("compose", {"optimizer": "best-single", "objective": "tokens", "base_test": "shots"}),
    LOO: ("compose", {"optimizer": "best-single", "base_test": "loo", "loo_se": 0.0}),
    AUTO: ("compose", {**_AUTO, "loo_se": 0.0}),
    AUTO_SE: ("compose", {**_AUTO, "loo_se": 1.0}),
    "cmaes +base": ("compose", {"optimizer": "cmaes"}),
    # issue 11: a per-token gate fitted to the shots (its mean weights per module are the adapter)
    "gate +base": ("compose", {"optimizer": "gate", "merge": "mixture"}),
    # more shots, when the user has them (the test set stays; the shots come from the rest)
    "best-single +base, 10 shots": ("compose", {"optimizer": "best-single", "base_test": "shots"}),
    "best-single +base, 20 shots": ("compose", {"optimizer": "best-single", "base_test": "shots"}),
    # issue 33: the default (leave-one-out, 1-SE) given more shots, which users often have
    AUTO_SE + ", 10 shots": ("compose", {**_AUTO, "loo_se": 1.0}),
    AUTO_SE + ", 20 shots": ("compose", {**_AUTO, "loo_se": 1.0}),
    # issue 36: the generalists as candidates too, for the base test to accept or refuse
    GENERALISTS: ("compose", {**_AUTO, "loo_se": 1.0, "multitask": True, "fallback": "always"}),
}
RETIRED = {  # measured, rejected, and taken out of ComposeConfig (issue 34): their rows stay in the results;
    # `git checkout a8f0645` runs them again
    "cmaes top-5 +base": "fit weights over the 5 candidates with the lowest single loss (`top`)",
    PRIOR: "ties within one standard error go to the best retrieved expert (`prior_se`)",
    AUTO_SE + ", shrink 0.5": "the update shrunk toward the base model (`shrink`)",
}
SHOTS = {"best-single +base, 10 shots": 10, "best-single +base, 20 shots": 20,
         AUTO_SE + ", 10 shots": 10, AUTO_SE + ", 20 shots": 20}  # every other method: 5
SHOTS_TEST_SHOTS = ["best-single +base, 10 shots", "best-single +base, 20 shots"]
DEFAULT_SHOTS = [AUTO_SE + ", 10 shots", AUTO_SE + ", 20 shots"]
DEFAULT = AUTO_SE  # compose's default configuration
SHOT_FREE = {"zero-shot", "oracle"}  # they never see the shots: one run per task, at shot seed 0
POOL_FREE = {"zero-shot", "icl", "oracle"}  # they never see the library: one run serves both regimes


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """A METHODS overrides dict as (ComposeConfig keys, Variant keys); a key of neither is refused."""
    user, variant = {f.name for f in fields(ComposeConfig)}, {f.name for f in fields(Variant)}
    unknown = sorted(set(overrides) - user - variant)
    if unknown:
        raise ValueError(f"overrides name no ComposeConfig or Variant field: {unknown}")
    return ({k: v for k, v in overrides.items() if k in user}, {k: v for k, v in overrides.items() if k in variant})


@lru_cache(maxsize=None)
def far_exclusions(library: Library, task_name: str) -> tuple[str, ...]:
    """Experts trained on a task of the task's family (the multitask LoRA too, if it saw one), or as close to it
    as FAR_DESCRIPTION / FAR_CENTROID."""
    task = load_task(resolve_task(task_name))
    train, _ = split_examples(task.examples, 50, 0)
    description = library.embed([task.description or task_name])[0]
    centroid = library.centroid([task.routing_text(ex) for ex in train[:200]])
    family = task_name.split("__")[0]
    out = []
    for name in library.names():
        vectors = library.vectors(name)
        close = float(vectors["description"].numpy() @ description) >= FAR_DESCRIPTION or (
            "centroid" in vectors and float(vectors["centroid"].numpy() @ centroid) >= FAR_CENTROID)
        if close or family in {t.split("__")[0] for t in (name, *trained_on(library, name))}:
            out.append(name)
    return tuple(out)


@torch.no_grad()
def time_objective(model, tokenizer, library: Library, task_name: str, k: int = 20) -> dict:
    """Seconds for one objective evaluation on the same 5-example batch, three ways, and for whole compositions."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    task = load_task(resolve_task(task_name))
    few = replace(task, examples=split_examples(task.examples, 100, 0)[0][:5])
    cfg = ComposeConfig(k=k)
    names = [n for n, _ in select_candidates(library, cfg, task.description,
                                             [few.routing_text(e) for e in few.examples])]
    batch = collate([encode_pair(tokenizer, few.build_prompt(e), e.target, cfg.max_length, eos=True)
                     for e in few.examples], tokenizer.pad_token_id)
    w = torch.randn(len(names)) * 0.3
    # all three compute logits only where answers are predicted, as the objective does
    plain = median_time(lambda: answer_forward(model, batch), 9)
    routed = RoutedModel(model, load_stack(library, names).modules, "lorahub")
    objective = FewShotObjective(routed, tokenizer, few, few.examples, cfg, Variant())
    fused_s = median_time(lambda: objective.losses(w[None]), 9)
    routed.remove()
    # LoraHub's loop: sum every candidate's state dict with weights, copy it into a peft model, forward.
    cache = [load_file(str(library.expert_path(n) / "adapter_model.safetensors")) for n in names]
    peft_model = PeftModel.from_pretrained(model, str(library.expert_path(names[0]))).eval()

    def lorahub_eval():
        merged = {key: sum(wi * sd[key].float() for wi, sd in zip(w.tolist(), cache)) for key in cache[0]}
        set_peft_model_state_dict(peft_model, merged)
        answer_forward(peft_model, batch)

    lorahub_s = median_time(lorahub_eval, 9)
    peft_model.unload()
    whole = {}  # the whole compose() call: retrieval, loading, fitting, final score (embedder already loaded)
    for optimizer in ("best-single", "cmaes", "ngopt"):
        start = time.perf_counter()
        compose(model, tokenizer, few, library, ComposeConfig(k=k, optimizer=optimizer), description=task.description)
        whole[f"compose k={k} {optimizer} s"] = time.perf_counter() - start
    return {"candidates": len(names), "batch tokens": int(batch["attention_mask"].sum()), **whole,
            "plain forward s": plain, "fused objective s": fused_s, "lorahub-style s": lorahub_s,
            "fused / plain": fused_s / plain, "lorahub-style / fused": lorahub_s / fused_s}


def run_rows(model, tokenizer, library, tasks, seeds, n_test, methods, regimes, rows_file: Path) -> None:
    """Append one row per (task, shot seed, regime, method) not yet in `rows_file`; the test set is fixed per
    task. Seed by seed, so that every task has its first seed before any has its second."""
    from filelock import FileLock

    lock = FileLock(str(rows_file) + ".lock")
    for seed in range(seeds):
        for task_name in tasks:
            task = load_task(resolve_task(task_name))
            base_cfg = EvalConfig(shots=5, n_test=n_test, seed=0, shot_seed=seed)
            for regime in regimes:
                for name in methods:
                    key = (task_name, seed, "near" if name in POOL_FREE else regime, name)
                    with lock:
                        seen = {row_key(r) for r in read_rows(rows_file)}
                    if key in seen or (name in SHOT_FREE and seed > 0):
                        continue
                    method, overrides = METHODS[name]
                    cfg = replace(base_cfg, shots=SHOTS.get(name, 5))
                    options = {"library": library} if "library" in method_options(method) else {}
                    if overrides:
                        user, variant = split_overrides(overrides)
                        options["compose_cfg"] = ComposeConfig(seed=seed, **user)
                        options["variant"] = Variant(**variant)
                    if "exclude" in method_options(method) and key[2] == "far":
                        options["exclude"] = list(far_exclusions(library, task_name))
                    r = evaluate(model, tokenizer, task, method, cfg, **options)
                    row = {"task": task_name, "seed": seed, "regime": key[2], "method": name, "accuracy": r.accuracy,
                           "n": r.n, "input_tokens_per_example": r.input_tokens_per_example, "adapt_s": r.adapt_s,
                           **({"notes": r.notes} if r.notes else {})}
                    with lock, rows_file.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(row, flush=True)


def row_key(row: dict) -> tuple:
    return row["task"], row["seed"], row.get("regime", "near"), row["method"]


def read_rows(rows_file: Path) -> list[dict]:
    return [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []


def summarize(rows: list[dict], units: list[tuple[str, str]], seeds: int, methods: list[str]) -> tuple[list[dict], str]:
    """Per method, over the complete (task, regime) units: the mean over units and seeds, the spread over seeds
    of the unit mean, the best seed, and wins / losses against zero-shot (per unit, mean over seeds); and a
    per-unit table. A unit counts once every method has all its seeds there (shot-free methods: seed 0), so
    every method is compared on the same units and seeds.
    """
    acc = {row_key(r): r for r in rows if r["seed"] < seeds}
    wanted = lambda m: range(1 if m in SHOT_FREE else seeds)  # noqa: E731
    pool = lambda m, regime: "near" if m in POOL_FREE else regime  # noqa: E731
    methods = [m for m in methods if any(k[3] == m for k in acc)]
    complete = [(t, g) for t, g in units if all((t, s, pool(m, g), m) in acc for m in methods for s in wanted(m))]
    if not methods or not complete:
        return [], "(no task is complete yet)"
    per_unit = {(u, m): statistics.mean(acc[u[0], s, pool(m, u[1]), m]["accuracy"] for s in wanted(m))
                for u in complete for m in methods}
    table = []
    for m in methods:
        mine = [acc[t, s, pool(m, g), m] for t, g in complete for s in wanted(m)]
        by_seed = [statistics.mean(acc[t, s, pool(m, g), m]["accuracy"] for t, g in complete) for s in wanted(m)]
        zero = [per_unit[u, "zero-shot"] for u in complete] if "zero-shot" in methods else None
        table.append({"method": m, "tasks": len(complete), "seeds": len(by_seed),
                      "mean accuracy": statistics.mean(by_seed), "std over seeds": statistics.pstdev(by_seed),
                      "best seed": max(by_seed),
                      "wins / losses vs zero-shot": "-" if zero is None else
                      f"{sum(per_unit[u, m] > z for u, z in zip(complete, zero))} / "
                      f"{sum(per_unit[u, m] < z for u, z in zip(complete, zero))}",
                      "input tokens / example": statistics.mean(r["input_tokens_per_example"] for r in mine),
                      "adaptation s": statistics.mean(r["adapt_s"] for r in mine)})
    header = "| task | regime | " + " | ".join(methods) + " |\n|---|---|" + "---|" * len(methods) + "\n"
    body = "".join(f"| {t} | {g} | " + " | ".join(f"{per_unit[(t, g), m]:.3f}" for m in methods) + " |\n"
                   for t, g in complete)
    return table, header + body


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = [r["method"] for r in table]
    ax.barh(names, [r["mean accuracy"] for r in table], xerr=[r["std over seeds"] for r in table], color="tab:blue")
    ax.invert_yaxis()
    ax.set(xlabel="mean accuracy over held-out dev tasks (bar: std over shot seeds)",
           title=f"few-shot composition ({path.stem.split('.')[-1] if '.' in path.stem else 'all'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10, help="the first N dev tasks for the near regime")
    parser.add_argument("--far-tasks", type=int, default=24, help="the first N dev tasks for the far regime")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--far-methods", nargs="+", choices=list(METHODS),
                        help="methods of the far and all tables (default: --methods)")
    parser.add_argument("--far-seeds", type=int, help="shot seeds of the far and all tables (default: --seeds)")
    parser.add_argument("--regimes", nargs="+", default=["near", "far"], choices=["near", "far"])
    parser.add_argument("--shard", default="0/1", help="I/N: this process runs every N-th task from the I-th")
    parser.add_argument("--timing", action="store_true", help="also time one objective evaluation three ways")
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from the recorded rows")
    parser.add_argument("--rows", type=Path, help="run into this rows file instead (a rerun to compare with the "
                        "recorded rows: `benchmarks/compare_rows.py`); no report is written")
    args = parser.parse_args()
    index, count = (int(x) for x in args.shard.split("/"))
    if not 0 <= index < count:
        parser.error(f"--shard I/N needs 0 <= I < N, got {args.shard}")
    library = Library(REPO_ROOT / "library")
    model, tokenizer = load_base_model()
    near, far = dev_tasks()[: args.tasks], dev_tasks()[: args.far_tasks]
    timing_file, rows_file = RESULTS / "compose_bench.timing.json", args.rows or RESULTS / "compose_bench.rows.jsonl"
    if args.timing:
        timing_file.write_text(json.dumps(time_objective(model, tokenizer, library, near[0]), indent=1) + "\n")
    if not args.report_only:
        for regime in args.regimes:
            tasks = near if regime == "near" else far
            run_rows(model, tokenizer, library, tasks[index::count], args.seeds, args.n_test, args.methods, [regime],
                     rows_file)
    if args.rows:
        return
    rows = read_rows(rows_file)
    units = {"near": [(t, "near") for t in near], "far": [(t, "far") for t in far]}
    units["all"] = units["near"] + units["far"]
    sections, summary = [], {}
    far_methods, far_seeds = args.far_methods or args.methods, args.far_seeds or args.seeds
    for name, unit_list in units.items():
        table, per_task = summarize(rows, unit_list, args.seeds if name == "near" else far_seeds,
                                    args.methods if name == "near" else far_methods)
        summary[name] = table
        sections.append(f"## {name}\n\n" + _markdown(table) + "\nPer task (mean over seeds):\n\n" + per_task)
        if table:
            plot(table, RESULTS / f"compose_bench.{name}.png" if name != "all" else RESULTS / "compose_bench.png")
    # near at shot seed 0, with the options run there at that seed only (the leave-one-out base test)
    table, per_task = summarize(rows, units["near"], 1, ["zero-shot", "best-single", SHOTS_TEST, LOO, AUTO, DEFAULT])
    summary["near, shot seed 0"] = table
    sections.append("## near, shot seed 0\n\nThe base tests where siblings exist.\n\n"
                    + _markdown(table) + "\nPer task:\n\n" + per_task)
    # the default on the dev tasks past --tasks facing the whole library (near): a new task, as a user brings one
    fresh = [(t, "near") for t in far[args.tasks:]]
    table, per_task = summarize(rows, fresh, 1, ["zero-shot", AUTO, DEFAULT])
    summary["new tasks, whole library"] = table
    wanted = {(t, 0, "near", DEFAULT) for t, _ in fresh}
    notes = [r["notes"] for r in rows if row_key(r) in wanted and "notes" in r]
    tests = ", ".join(f"{test} on {sum(n['base_test'] == test for n in notes)}"
                      for test in sorted({n["base_test"] for n in notes}))
    sections.append(f"## new tasks, whole library\n\nThe default on dev tasks {args.tasks + 1}..{args.far_tasks} in "
                    "the near regime (every expert a candidate), shot seed 0. Base test run (recorded for "
                    f"{len(notes)} of {len(fresh)} tasks, {DEFAULT}): " + (tests or "none")
                    + (f"; best retrieval score at most {max(n['best_score'] for n in notes):.3f} (close: "
                       "the library's calibration)" if notes else "") + ".\n\n"
                    + (_markdown(table) + "\nPer task:\n\n" + per_task if table else "(not run yet)\n"))
    # the shots test given more shots, on the far tasks that have all three (shot seed 0; the test set stays)
    table, per_task = summarize(rows, units["far"], 1, ["zero-shot", SHOTS_TEST, *SHOTS_TEST_SHOTS])
    summary["far, by shots"] = table if any(r["method"] in SHOTS for r in table) else []
    sections.append("## far, by shots\n\n`best-single +base` given 5, 10 or 20 shots, shot seed 0, on the far tasks "
                    "where all three ran.\n\n" + (_markdown(table) + "\nPer task:\n\n" + per_task
                                                      if summary["far, by shots"] else "(not run yet)\n"))
    if summary["far, by shots"]:
        plot(table, RESULTS / "compose_bench.shots.png")
    table, per_task = summarize(rows, units["far"], 1, ["zero-shot", DEFAULT, *DEFAULT_SHOTS])
    summary["far, the default by shots"] = table if any(r["method"] in DEFAULT_SHOTS for r in table) else []
    sections.append("## far, the default by shots\n\nThe default (leave-one-out with the 1-SE rule where no candidate "
                    "is close) given 5, 10 or 20 shots, shot seed 0, on the far tasks where all three ran.\n\n"
                    + (_markdown(table) + "\nPer task:\n\n" + per_task if summary["far, the default by shots"]
                       else "(not run yet)\n"))
    # the spread over shot seeds on far: the shots test, then the default, over the seeds each ran on every far task
    done = {row_key(r) for r in rows}
    every = lambda m, seeds: all((t, s, "far", m) in done for t, _ in units["far"] for s in range(seeds))  # noqa: E731
    for title, anchor, methods in (
            ("far, by shot seed", SHOTS_TEST, ("zero-shot", SHOTS_TEST, LOO, AUTO, "lorahub")),
            ("far, the default by shot seed", DEFAULT, ("zero-shot", SHOTS_TEST, AUTO, DEFAULT, PRIOR, "lorahub"))):
        seeds = 1
        while every(anchor, seeds + 1):
            seeds += 1
        seeded = [m for m in methods if m in SHOT_FREE or every(m, seeds)]
        table, per_task = summarize(rows, units["far"], seeds, seeded)
        summary[title] = table if seeds > 1 else []
        sections.append(f"## {title}\n\n{', '.join(seeded)} over shot seeds 0..{seeds - 1}, each run on every far "
                        "task.\n\n" + (_markdown(table) + "\nPer task (mean over seeds):\n\n" + per_task
                                                  if summary[title] else "(one seed so far)\n"))
    sections.append("## far, a mix where the default keeps the base model\n\nRead from the rows above, nothing rerun: "
                    f"`{DEFAULT}`, except that a unit where it kept the base model takes a mixture's result. Shown "
                    "for each mixture and shot seed with rows on every far task.\n\n"
                    + _markdown(mix_fallback(rows, [t for t, _ in units["far"]])))
    shown = {r["method"] for table in summary.values() for r in table}
    partial = sorted({r["method"] for r in rows} - shown)
    sections.append("Not in any table (no complete task): " + (", ".join(f"{m} ({sum(r['method'] == m for r in rows)} "
                    "rows)" for m in partial) or "none") + "; never run: " +
                    (", ".join(sorted(set(METHODS) - {r["method"] for r in rows})) or "none") + ". Retired (rows "
                    "recorded with commit a8f0645, the options since removed): " + "; ".join(
                        f"{name}: {why}" for name, why in RETIRED.items()) + ".\n\n"
                    "## all, as in compose_bench.json's rows\n")
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    print(write_results("compose_bench", summary["all"], timing,
                        f"python benchmarks/compose_bench.py --tasks {args.tasks} --far-tasks {args.far_tasks} "
                        f"--seeds {args.seeds} --n-test {args.n_test}"
                        + (" --methods " + " ".join(f"'{m}'" for m in args.methods) if args.methods != list(METHODS) else "")
                        + (" --far-methods " + " ".join(f"'{m}'" for m in far_methods) if args.far_methods else "")
                        + (f" --far-seeds {far_seeds}" if args.far_seeds else ""),
                        "Summary: one objective evaluation on the same 5-example batch (median of 9). Each task's "
                        "test set is fixed (split seed 0); a seed redraws the 5 shots and the candidates' draw and "
                        f"optimizer. zero-shot and oracle never see the shots and run once per task. `near`: the "
                        f"whole library; `far`: no expert of the task's family, none with description cosine >= "
                        f"{FAR_DESCRIPTION} or input-centroid cosine >= {FAR_CENTROID}. `all`: near and far units "
                        "together. The table below is `all`.\n\n" + "\n".join(sections)))


def mix_fallback(rows: list[dict], tasks: list[str], mixes=("lorahub", "cmaes top-5 +base", "gate +base")) -> list[dict]:
    """The default with a mixture where it kept the base model (no expert passed its base test), per shot seed."""
    by = {row_key(r): r for r in rows}
    zero = [by[t, 0, "near", "zero-shot"]["accuracy"] for t in tasks] if all(
        (t, 0, "near", "zero-shot") in by for t in tasks) else None
    out = []
    for mix in mixes:
        for seed in sorted({r["seed"] for r in rows}):
            pairs = [(by.get((t, seed, "far", DEFAULT)), by.get((t, seed, "far", mix))) for t in tasks]
            if zero is None or not all(d and m and "notes" in d for d, m in pairs):
                continue
            kept = [d["notes"]["base_won"] for d, _ in pairs]
            ours, mixed = [d["accuracy"] for d, _ in pairs], [m["accuracy"] if k else d["accuracy"]
                                                            for (d, m), k in zip(pairs, kept)]
            out.append({"mixture": mix, "shot seed": seed, "base kept (units)": sum(kept),
                        "default": statistics.mean(ours), "with the mixture": statistics.mean(mixed),
                        "losses to zero-shot, default": sum(a < z for a, z in zip(ours, zero)),
                        "losses to zero-shot, with the mixture": sum(a < z for a, z in zip(mixed, zero))})
    return out


def _markdown(table: list[dict]) -> str:
    if not table:
        return "(no task is complete yet)\n"
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r.values()) + " |" for r in table]) + "\n"


if __name__ == "__main__":
    main()
