"""Few-shot composition on held-out dev tasks: every method, several seeds, 5 shots; plus the cost
of one objective evaluation (fused module, plain forward, LoraHub-style merge-and-copy).

    python benchmarks/compose_bench.py [--tasks 10] [--seeds 3] [--n-test 100] [--timing-only]
Rows are appended to results/compose_bench.rows.jsonl as they finish, so a rerun resumes.
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

from lorahub_plus.compose import ComposeConfig, FewShotObjective, load_stack, select_candidates  # noqa: E402
from lorahub_plus.encode import collate, encode_pair  # noqa: E402
from lorahub_plus.evaluate import EvalConfig, evaluate  # noqa: E402
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
    """Seconds for one objective evaluation on the same 5-example batch, three ways."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    task = load_task(resolve_task(task_name))
    few = replace(task, examples=split_examples(task.examples, 100, 0)[0][:5])
    cfg = ComposeConfig(k=k)
    names = [n for n, _ in select_candidates(library, cfg, task.description, [e.input for e in few.examples])]
    batch = collate([encode_pair(tokenizer, few.build_prompt(e), e.target, cfg.max_length) for e in few.examples],
                    tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    w = torch.randn(len(names)) * 0.3
    plain = _median_time(lambda: model(**inputs))
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
        peft_model(**inputs)

    lorahub_s = _median_time(lorahub_eval)
    peft_model.unload()
    return {"candidates": len(names), "batch tokens": int(batch["attention_mask"].sum()),
            "plain forward s": plain, "fused objective s": fused_s, "lorahub-style s": lorahub_s,
            "fused / plain": fused_s / plain, "lorahub-style / fused": lorahub_s / fused_s}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--timing-only", action="store_true")
    args = parser.parse_args()
    library = Library(REPO_ROOT / "library")
    model, tokenizer = load_base_model()
    tasks = dev_tasks()[: args.tasks]
    timing = time_objective(model, tokenizer, library, tasks[0])
    print(json.dumps(timing, indent=1), flush=True)
    rows_file = RESULTS / "compose_bench.rows.jsonl"
    done = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    seen = {(r["task"], r["seed"], r["method"]) for r in done}
    for task_name in [] if args.timing_only else tasks:
        task = load_task(resolve_task(task_name))
        for seed in range(args.seeds):
            cfg = EvalConfig(shots=5, n_test=args.n_test, seed=seed)
            for name in args.methods:
                if (task_name, seed, name) in seen:
                    continue
                method, overrides = METHODS[name]
                compose_cfg = ComposeConfig(seed=seed, **overrides) if overrides else None
                r = evaluate(model, tokenizer, task, method, cfg, library=library, seed=seed, compose_cfg=compose_cfg)
                row = {"task": task_name, "seed": seed, "method": name, "accuracy": r.accuracy, "n": r.n,
                       "input_tokens_per_example": r.input_tokens_per_example, "adapt_s": r.adapt_s}
                with rows_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
                print(row, flush=True)
    table = []
    for name in METHODS:
        rows = [r for r in done if r["method"] == name and r["task"] in tasks]
        if not rows:
            continue
        accs = [r["accuracy"] for r in rows]
        table.append({"method": name, "runs": len(rows), "mean accuracy": statistics.mean(accs),
                      "std": statistics.pstdev(accs),
                      "input tokens / example": statistics.mean(r["input_tokens_per_example"] for r in rows),
                      "adaptation s": statistics.mean(r["adapt_s"] for r in rows)})
    print(write_results("compose_bench", table, timing,
                        f"python benchmarks/compose_bench.py --tasks {args.tasks} --seeds {args.seeds} "
                        f"--n-test {args.n_test}" + (" --timing-only" if args.timing_only else ""),
                        "Summary: one objective evaluation on the same 5-example batch (median of 9)."))


if __name__ == "__main__":
    main()
