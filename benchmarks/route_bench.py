"""Routing: speed against the base model and peft's X-LoRA and Arrow, the cost of one routed forward against
K, Arrow parity with peft, and accuracy on an in-domain mixed stream and on unseen dev tasks.

    python benchmarks/route_bench.py [--sections speed scaling parity stream unseen] [--per-task 10]
Each section writes its part of results/route_bench.json as it finishes (a rerun of some sections keeps
the others); the Markdown and the plot are rewritten from all of them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_baselines import dev_tasks  # noqa: E402
from report import RESULTS, median_time, write_results  # noqa: E402

from lorahub_plus.evaluate import EvalConfig, evaluate, score  # noqa: E402
from lorahub_plus.library import Library  # noqa: E402
from lorahub_plus.models import load_base_model  # noqa: E402
from lorahub_plus.paths import REPO_ROOT, resolve_task  # noqa: E402
from lorahub_plus.routed import RoutedModel  # noqa: E402
from lorahub_plus.routers import ArrowRouter, RetrievalRouter, Router, RouterConfig, mean_token_weights  # noqa: E402
from lorahub_plus.stack import load_stack  # noqa: E402
from lorahub_plus.tasks import load_task, split_examples  # noqa: E402

PARTS = RESULTS / "route_bench.parts.json"


def held_out(library: Library, name: str, n: int):
    """(task, its card's held-out test examples, at most n): never trained on."""
    card = library.card(name)
    task = load_task(resolve_task(card.source_task))
    return task, split_examples(task.examples, card.metrics["n_test"], card.metrics["split_seed"])[1][:n]


@torch.no_grad()
def speed(model, tokenizer, library: Library) -> dict:
    """Greedy decoding tokens/s (32 new tokens) at batch 1 and 16 and prefill tokens/s, each against the base."""
    from peft import PeftModel

    names = library.names()
    prompts = [task.build_prompt(test[0]) for task, test in (held_out(library, n, 1) for n in names[:16])]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batches = {b: tokenizer(prompts[:b], return_tensors="pt", padding=True, truncation=True, max_length=256)
               for b in (1, 16)}
    tokenizer.padding_side = side

    def measure(m, routes=None):
        out = {}
        for b, batch in batches.items():
            kw = {} if routes is None else {"routes": routes(b)}
            s = median_time(lambda: m.generate(**batch, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                               pad_token_id=tokenizer.pad_token_id, **kw), 3)
            out[f"decode b={b} tok/s"] = b * 32 / s
        kw = {} if routes is None else {"routes": routes(16)}
        s = median_time(lambda: m(**batches[16], **kw), 3)
        out["prefill tok/s"] = int(batches[16]["attention_mask"].sum()) / s
        return out

    rows = {"base": measure(model)}
    one = PeftModel.from_pretrained(model, str(library.expert_path(names[0]))).eval()
    rows["one LoRA (peft)"] = measure(one)
    model = one.unload()
    for kind in ("retrieval", "arrow"):
        router = Router(library, model, tokenizer, RouterConfig(router=kind, k=3))
        inputs = [held_out(library, n, 1)[1][0].input for n in names[:16]]
        rows[f"{kind} top-3 of {len(names)}"] = measure(router.model, None if kind == "arrow"
                                                        else lambda b: router.routes(inputs[:b]))
        model = router.remove()
    rows.update(_peft_routers(model, library, measure))
    base = rows["base"]
    return {name: {**r, **{f"{k} / base": v / base[k] for k, v in r.items()}} for name, r in rows.items()}


def _peft_routers(model, library: Library, measure) -> dict:
    """peft's own X-LoRA (two passes, no KV cache) and Arrow on the same experts."""
    import copy

    from peft import ArrowConfig, XLoraConfig, create_arrow_model, get_peft_model

    paths = [str(library.expert_path(n)) for n in library.names()]
    out = {}
    arrow = create_arrow_model(copy.deepcopy(model), paths, ArrowConfig(top_k=3, router_temperature=1.0, rng_seed=0))
    out[f"peft Arrow top-3 of {len(paths)}"] = measure(arrow.eval())
    del arrow
    plain = copy.deepcopy(model)
    plain.config.use_cache = False  # X-LoRA refuses the KV cache: it runs the model twice per step
    xlora = get_peft_model(plain, XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, xlora_depth=1, top_k_lora=3,
        adapters={f"e{i}": p for i, p in enumerate(paths)})).eval()
    out[f"peft X-LoRA top-3 of {len(paths)}"] = measure(xlora)
    return out


@torch.no_grad()
def scaling(model, tokenizer, library: Library) -> dict:
    """Seconds for one routed forward (16 rows x 64 tokens) with K random experts on every q/v, dense rows
    (every weight nonzero) and top-3 rows."""
    stack = load_stack(library, library.names()[:1]).modules
    ids = torch.randint(100, 1000, (16, 64))
    out = {}
    for K in (8, 61, 200):
        gen = torch.Generator().manual_seed(K)
        experts = {m: (torch.randn(K, *A.shape[1:], generator=gen) * 0.01, torch.randn(K, *B.shape[1:], generator=gen) * 0.01)
                   for m, (A, B) in stack.items()}
        routed = RoutedModel(model, experts, "mixture")
        dense = torch.softmax(torch.randn(16, K, generator=gen), -1)
        top3 = torch.zeros(16, K).scatter(1, torch.randint(0, K, (16, 3), generator=gen), 1 / 3)
        out[f"K={K} dense s"] = median_time(lambda: routed(input_ids=ids, routes=dense), 5)
        out[f"K={K} top-3 s"] = median_time(lambda: routed(input_ids=ids, routes=top3), 5)
        routed.remove()
    out["plain forward s"] = median_time(lambda: model(input_ids=ids), 5)
    return out


@torch.no_grad()
def parity(model, tokenizer, library: Library, n: int = 8) -> dict:
    """Our arrow router against peft's create_arrow_model on the first n experts and 16 prompts: largest logit
    difference with peft's own prototypes (15 power iterations) and with ours given to peft."""
    import copy

    from peft import ArrowConfig, create_arrow_model

    names = library.names()[:n]
    prompts = [task.build_prompt(test[0]) for task, test in (held_out(library, m, 1) for m in library.names()[:16])]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=256)
    theirs = create_arrow_model(copy.deepcopy(model), [str(library.expert_path(m)) for m in names],
                                ArrowConfig(top_k=3, router_temperature=1.0, rng_seed=0)).eval()
    stack = load_stack(library, names)
    router = ArrowRouter(library, names, stack.modules, RouterConfig(router="arrow", k=3, temperature=1.0))
    ours = RoutedModel(model, stack.modules, "mixture", router=router)
    mask = batch["attention_mask"].bool()
    mine = ours(**batch).logits[mask]
    own = theirs(**batch).logits[mask]
    layers = peft_arrow_layers(theirs, list(stack.modules))
    cosines = [float((layer.prototypes.float() * getattr(router, f"prototypes_{i}")).sum(-1).abs().min())
               for i, layer in layers.items()]
    for i, layer in layers.items():
        layer.prototypes = getattr(router, f"prototypes_{i}").clone()
    shared = theirs(**batch).logits[mask]
    ours.remove()
    return {"experts": n, "max |logit diff|, peft's prototypes": float((mine - own).abs().max()),
            "max |logit diff|, same prototypes": float((mine - shared).abs().max()),
            "min |cos| ours vs peft prototype": min(cosines), "logit scale (max |logit|)": float(own.abs().max())}


def peft_arrow_layers(peft_model, module_names: list[str]) -> dict:
    """{our stack index: peft's arrow router layer} matched by module name (peft built its prototypes already)."""
    return {module_names.index(name.removeprefix("base_model.model.")): m.lora_arrow["arrow_router"]
            for name, m in peft_model.named_modules() if "arrow_router" in getattr(m, "lora_arrow", {})}


@torch.no_grad()
def stream(model, tokenizer, library: Library, per_task: int) -> dict:
    """Held-out examples of every library task as one stream: accuracy per method (mean over tasks) and how often
    the top-1 expert is the example's own. One routed model serves all methods: routes given per row win over
    its arrow router (zeros: the base model; 1/K: the uniform average; one-hot: the task's own expert)."""
    names, K = library.names(), len(library.names())
    cfg = EvalConfig(n_test=per_task, batch_size=16)
    stack = load_stack(library, names)
    routed = RoutedModel(model, stack.modules, "mixture",
                         router=ArrowRouter(library, names, stack.modules, RouterConfig(router="arrow", k=3)))
    retrieval = RetrievalRouter(library, names, stack.modules, RouterConfig(router="retrieval", k=3))
    acc = {m: [] for m in ("zero-shot", "uniform", "oracle", "retrieval", "arrow")}
    top1 = {"retrieval": [], "arrow": []}
    for i, name in enumerate(names):
        task, test = held_out(library, name, per_task)
        n = len(test)
        routes = retrieval.routes([ex.input for ex in test])
        top1["retrieval"] += (routes.argmax(-1) == i).tolist()
        top1["arrow"] += [int(mean_token_weights(routed, tokenizer, task.build_prompt(ex)).argmax()) == i for ex in test]
        for method, rows in (("zero-shot", torch.zeros(n, K)), ("uniform", torch.full((n, K), 1 / K)),
                             ("oracle", torch.nn.functional.one_hot(torch.full((n,), i), K).float()),
                             ("retrieval", routes), ("arrow", None)):
            acc[method].append(_acc(score(routed, tokenizer, task, test, cfg=cfg, routes=rows)))
        print(name, {m: round(v[-1], 3) for m, v in acc.items()}, flush=True)
    routed.remove()
    table = {m: statistics.mean(v) for m, v in acc.items()}
    return {"tasks": K, "examples per task": per_task, **{f"{m} accuracy": v for m, v in table.items()},
            "retrieval top-1 = own expert": statistics.mean(top1["retrieval"]),
            "arrow top-1 = own expert": statistics.mean(top1["arrow"]),
            "best router / oracle": max(table["retrieval"], table["arrow"]) / table["oracle"]}


def _acc(scored) -> float:
    correct = scored[0]
    return sum(correct) / len(correct)


def unseen(model, tokenizer, library: Library, n_test: int) -> dict:
    """Dev tasks (no expert trained on them): each router against zero-shot; compose from compose_bench's rows."""
    rows = [json.loads(line) for line in (RESULTS / "compose_bench.rows.jsonl").read_text().splitlines()]
    out = {}
    for name in dev_tasks():
        task = load_task(resolve_task(name))
        cfg = EvalConfig(n_test=n_test, seed=0)
        r = {m: evaluate(model, tokenizer, task, m, cfg, **({"library": library} if m.startswith("route") else {})).accuracy
             for m in ("zero-shot", "route-retrieval", "route-arrow")}
        composed = [x["accuracy"] for x in rows if x["task"] == name and x["method"] == "best-single +base"
                    and x.get("regime", "near") == "near"]
        r["compose (5 shots, mean over seeds)"] = statistics.mean(composed) if composed else None
        out[name] = r
        print(name, r, flush=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", nargs="+", default=["speed", "scaling", "parity", "stream", "unseen"])
    parser.add_argument("--per-task", type=int, default=10)
    parser.add_argument("--n-test", type=int, default=50)
    args = parser.parse_args()
    library = Library(REPO_ROOT / "library")
    model, tokenizer = load_base_model()
    parts = json.loads(PARTS.read_text()) if PARTS.exists() else {}
    for section in args.sections:
        fn = {"speed": speed, "scaling": scaling, "parity": parity, "stream": stream, "unseen": unseen}[section]
        extra = {"stream": (args.per_task,), "unseen": (args.n_test,)}.get(section, ())
        parts[section] = fn(model, tokenizer, library, *extra)
        PARTS.write_text(json.dumps(parts, indent=1) + "\n")
    rows = [{"configuration": name, **values} for name, values in parts.get("speed", {}).items()]
    summary = {f"{section}: {k}": v for section in ("scaling", "parity", "stream") for k, v in parts.get(section, {}).items()}
    if "unseen" in parts:
        means = {m: statistics.mean(r[m] for r in parts["unseen"].values() if r[m] is not None)
                 for m in next(iter(parts["unseen"].values()))}
        summary.update({f"unseen dev tasks: {m}": v for m, v in means.items()})
    print(write_results("route_bench", rows, summary, "python benchmarks/route_bench.py " + " ".join(
        ["--sections", *args.sections, "--per-task", str(args.per_task), "--n-test", str(args.n_test)]),
        "Speed rows: greedy decoding of 32 new tokens (median of 3) and one prefill forward of 16 prompts."))


if __name__ == "__main__":
    main()
