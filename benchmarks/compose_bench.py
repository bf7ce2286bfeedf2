"""Few-shot composition on held-out dev tasks: every method, several seeds, 5 shots; plus the cost
of one objective evaluation (fused module, plain forward, LoraHub-style merge-and-copy).

    python benchmarks/compose_bench.py [--tasks 10] [--seeds 3] [--n-test 100] [--timing] [--shard I/N]
Rows are appended to results/compose_bench.rows.jsonl as they finish, so a rerun resumes, and
processes given different --shard values can run side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_baselines import dev_tasks  # noqa: E402
from report import RESULTS, write_results  # noqa: E402

from lorahub_plus.compose import ComposeConfig, FewShotObjective, compose, load_stack, select_candidates  # noqa: E402
from lorahub_plus.encode import answer_forward, collate, encode_pair  # noqa: E402
from lorahub_plus.evaluate import EvalConfig, evaluate, method_options  # noqa: E402
from lorahub_plus.fused import FusedLoRAModel  # noqa: E402
from lorahub_plus.library import Library  # noqa: E402
from lorahub_plus.models import load_base_model  # noqa: E402
from lorahub_plus.paths import REPO_ROOT, resolve_task  # noqa: E402
from lorahub_plus.tasks import load_task, split_examples  # noqa: E402

# name -> (evaluation method, ComposeConfig overrides for method `compose`)
METHODS = {
    "zero-shot": ("zero-shot", None), "icl": ("icl", None), "uniform": ("uniform", None),
    "best-single": ("best-single", None), "lorahub": ("lorahub", None),
    "compose cmaes/lorahub": ("compose", {"optimizer": "cmaes", "merge": "lorahub"}),
    "compose cmaes/mixture": ("compose", {"optimizer": "cmaes", "merge": "mixture"}),
    "compose gradient/mixture": ("compose", {"optimizer": "gradient", "merge": "mixture"}),
    "oracle": ("oracle", None),
}


def _median_time(fn, repeats: int = 9) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def time_objective(model, tokenizer, library: Library, task_name: str, k: int = 20) -> dict:
    """Seconds for one objective evaluation on the same 5-example batch, three ways, and for whole compositions."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    task = load_task(resolve_task(task_name))
    few = replace(task, examples=split_examples(task.examples, 100, 0)[0][:5])
    cfg = ComposeConfig(k=k)
    names = [n for n, _ in select_candidates(library, cfg, task.description, [e.input for e in few.examples])]
    batch = collate([encode_pair(tokenizer, few.build_prompt(e), e.target, cfg.max_length, eos=True)
                     for e in few.examples], tokenizer.pad_token_id)
    w = torch.randn(len(names)) * 0.3
    # all three compute logits only where answers are predicted, as the objective does
    plain = _median_time(lambda: answer_forward(model, batch))
    fused = FusedLoRAModel(model, load_stack(library, names).modules, "lorahub")
    objective = FewShotObjective(fused, tokenizer, few, few.examples, cfg)
    fused_s = _median_time(lambda: objective.losses(w[None]))
    fused.remove()
    # LoraHub's loop: sum every candidate's state dict with weights, copy it into a peft model, forward.
    cache = [load_file(str(library.expert_path(n) / "adapter_model.safetensors")) for n in names]
    peft_model = PeftModel.from_pretrained(model, str(library.expert_path(names[0]))).eval()

    def lorahub_eval():
        merged = {key: sum(wi * sd[key].float() for wi, sd in zip(w.tolist(), cache)) for key in cache[0]}
        set_peft_model_state_dict(peft_model, merged)
        answer_forward(peft_model, batch)

    lorahub_s = _median_time(lorahub_eval)
    peft_model.unload()
    whole = {}  # the whole compose() call: retrieval, loading, fitting, final score (embedder already loaded)
    for optimizer in ("best-single", "cmaes", "ngopt"):
        start = time.perf_counter()
        compose(model, tokenizer, few, library, ComposeConfig(k=k, optimizer=optimizer), description=task.description)
        whole[f"compose k={k} {optimizer} s"] = time.perf_counter() - start
    return {"candidates": len(names), "batch tokens": int(batch["attention_mask"].sum()), **whole,
            "plain forward s": plain, "fused objective s": fused_s, "lorahub-style s": lorahub_s,
            "fused / plain": fused_s / plain, "lorahub-style / fused": lorahub_s / fused_s}


SHOT_FREE = {"zero-shot", "oracle"}  # they never see the shots: one run per task, at shot seed 0


def run_rows(model, tokenizer, library, tasks, seeds, n_test, methods, rows_file: Path) -> None:
    """Append one row per (task, shot seed, method) not yet in `rows_file`; the test set is fixed per task."""
    from filelock import FileLock

    lock = FileLock(str(rows_file) + ".lock")
    for task_name in tasks:
        task = load_task(resolve_task(task_name))
        for seed in range(seeds):
            cfg = EvalConfig(shots=5, n_test=n_test, seed=0, shot_seed=seed)
            for name in methods:
                with lock:
                    seen = {(r["task"], r["seed"], r["method"]) for r in read_rows(rows_file)}
                if (task_name, seed, name) in seen or (name in SHOT_FREE and seed > 0):
                    continue
                method, overrides = METHODS[name]
                options = {"library": library} if "library" in method_options(method) else {}
                if overrides:
                    options["compose_cfg"] = ComposeConfig(seed=seed, **overrides)
                r = evaluate(model, tokenizer, task, method, cfg, **options)
                row = {"task": task_name, "seed": seed, "method": name, "accuracy": r.accuracy, "n": r.n,
                       "input_tokens_per_example": r.input_tokens_per_example, "adapt_s": r.adapt_s}
                with lock, rows_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(row, flush=True)


def read_rows(rows_file: Path) -> list[dict]:
    return [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []


def summarize(rows: list[dict], tasks: list[str], seeds: int, methods: list[str]) -> tuple[list[dict], str]:
    """Per method: mean over the complete tasks and seeds, the spread over seeds of the task mean, the best
    seed; and a per-task table. A task counts once every method has all its seeds there (shot-free
    methods: seed 0), so every method is compared on the same tasks and seeds.
    """
    rows = [r for r in rows if r["task"] in tasks and r["seed"] < seeds]
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    wanted = lambda m: range(1 if m in SHOT_FREE else seeds)  # noqa: E731
    acc = {(r["task"], r["seed"], r["method"]): r for r in rows}
    complete = [t for t in tasks if all((t, s, m) in acc for m in methods for s in wanted(m))]
    if not methods or not complete:
        return [], "(no task is complete yet)"
    table, per_task = [], {}
    for m in methods:
        mine = [acc[t, s, m] for t in complete for s in wanted(m)]
        by_seed = [statistics.mean(acc[t, s, m]["accuracy"] for t in complete) for s in wanted(m)]
        for t in complete:
            per_task[t, m] = statistics.mean(acc[t, s, m]["accuracy"] for s in wanted(m))
        table.append({"method": m, "tasks": len(complete), "seeds": len(by_seed),
                      "mean accuracy": statistics.mean(by_seed), "std over seeds": statistics.pstdev(by_seed),
                      "best seed": max(by_seed),
                      "input tokens / example": statistics.mean(r["input_tokens_per_example"] for r in mine),
                      "adaptation s": statistics.mean(r["adapt_s"] for r in mine)})
    header = "| task | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods) + "\n"
    body = "".join(f"| {t} | " + " | ".join(f"{per_task[t, m]:.3f}" for m in methods) + " |\n" for t in complete)
    return table, header + body


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = [r["method"] for r in table]
    ax.barh(names, [r["mean accuracy"] for r in table], xerr=[r["std over seeds"] for r in table], color="tab:blue")
    ax.invert_yaxis()
    ax.set(xlabel="mean accuracy over held-out dev tasks (bar: std over shot seeds)", title="few-shot composition")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--shard", default="0/1", help="I/N: this process runs every N-th task from the I-th")
    parser.add_argument("--timing", action="store_true", help="also time one objective evaluation three ways")
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from the recorded rows")
    args = parser.parse_args()
    index, count = (int(x) for x in args.shard.split("/"))
    if not 0 <= index < count:
        parser.error(f"--shard I/N needs 0 <= I < N, got {args.shard}")
    library = Library(REPO_ROOT / "library")
    model, tokenizer = load_base_model()
    tasks = dev_tasks()[: args.tasks]
    timing_file, rows_file = RESULTS / "compose_bench.timing.json", RESULTS / "compose_bench.rows.jsonl"
    if args.timing:
        timing_file.write_text(json.dumps(time_objective(model, tokenizer, library, tasks[0]), indent=1) + "\n")
    if not args.report_only:
        run_rows(model, tokenizer, library, tasks[index::count], args.seeds, args.n_test, args.methods, rows_file)
    table, per_task = summarize(read_rows(rows_file), tasks, args.seeds, args.methods)
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if table:
        plot(table, RESULTS / "compose_bench.png")
    print(write_results("compose_bench", table, timing,
                        f"python benchmarks/compose_bench.py --tasks {args.tasks} --seeds {args.seeds} "
                        f"--n-test {args.n_test}" + ("" if args.methods == list(METHODS) else
                                                         " --methods " + " ".join(f"'{m}'" for m in args.methods)),
                        "Summary: one objective evaluation on the same 5-example batch (median of 9). Each task's "
                        "test set is fixed (split seed 0); a seed redraws the 5 shots and the candidates' draw and "
                        "optimizer. zero-shot and oracle never see the shots and run once per task. Per task "
                        "(mean over seeds):\n\n" + per_task))


if __name__ == "__main__":
    main()
