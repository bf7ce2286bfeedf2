"""Routing: speed against the base model and peft's X-LoRA and Arrow, the cost of one routed forward against
K, Arrow parity with peft, and accuracy on an in-domain mixed stream and on unseen dev tasks.

    python benchmarks/route_bench.py [--sections speed scaling parity validation unseen stream] [--per-task 10]
        [--rounds 5] [--calibrate] [--routers retrieval arrow ...]
Each section writes its part of results/route_bench.json as it finishes (a rerun of some sections keeps
the others); the Markdown and the plot are rewritten from all of them.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose_bench import DEFAULT as COMPOSE, read_rows  # noqa: E402
from eval_baselines import dev_tasks  # noqa: E402
from report import RESULTS, calibrate, elapsed, hypernet_id, made_by, median_time, write_results  # noqa: E402

from lorahub_plus.scoring import EvalConfig, score
from lorahub_plus.evaluation import eval_split
from lorahub_plus.library.store import Library
from lorahub_plus.models import load_base_model
from lorahub_plus.paths import REPO_ROOT, resolve_task
from lorahub_plus.routed import RoutedModel
from lorahub_plus.routed import top_k_softmax
from lorahub_plus.routing.routers import ArrowRouter, RetrievalRouter, Router, RouterConfig, mean_token_weights
from lorahub_plus.library.stack import load_stack
from lorahub_plus.hypernet.synthesize import fallback_threshold, set_fallback_threshold
from lorahub_plus.tasks import load_task, split_examples

PARTS = RESULTS / "route_bench.parts.json"


def held_out(library: Library, name: str, n: int):
    """(task, its card's held-out test examples, at most n): never trained on."""
    card = library.card(name)
    task = load_task(resolve_task(card.source_task))
    return task, split_examples(task.examples, card.metrics["n_test"], card.metrics["split_seed"])[1][:n]


def stream_tasks(library: Library, stop: int, start: int = 0) -> dict:
    """{expert: (task, its held-out examples start..stop)} for every library task that has some there."""
    tasks = {name: held_out(library, name, stop) for name in library.names() if library.card(name).source_task}
    return {name: (task, test[start:]) for name, (task, test) in tasks.items() if test[start:]}


@torch.no_grad()
def speed(model, tokenizer, library: Library, rounds: int = 5, save=lambda rows: None) -> dict:
    """Greedy decoding tokens/s (32 new tokens) at batch 1 and 16 and prefill tokens/s, each against the base.
    Every configuration runs on its own copy of the base model. A round times each configuration once, in an order
    shuffled afresh each round (seeded), so neither a slow spell of the shared machine nor a place in the order,
    or a neighbour, favours one; a ratio is each round's tokens/s over the base's in the same round, its median over rounds. A second
    copy of the base model is timed like the others: its ratio is the run's noise floor. Routing the inputs is
    part of the time. `save` gets the rows after each round (a killed run keeps them)."""
    names = library.names()
    tests = [held_out(library, n, 1) for n in names[:16]]
    prompts = [task.build_prompt(test[0]) for task, test in tests]
    inputs = [task.routing_text(test[0]) for task, test in tests]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batches = {b: tokenizer(prompts[:b], return_tensors="pt", padding=True, truncation=True, max_length=256)
               for b in (1, 16)}
    tokenizer.padding_side = side
    configs = _speed_configs(model, tokenizer, library, inputs)

    def routing(routes, b) -> dict:
        return {} if routes is None else {"routes": routes(b)}

    def run(m, routes, b, new_tokens=32):
        return m.generate(**batches[b], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id, **routing(routes, b))

    for m, routes, sizes in configs.values():  # warm-up
        for b in sizes:
            run(m, routes, b, 2)
    times = {name: [] for name in configs}  # one {measure: tokens/s} per round
    tokens = int(batches[16]["attention_mask"].sum())
    order, shuffle = list(configs), random.Random(0).shuffle
    for _ in tqdm(range(rounds), desc="speed rounds"):
        shuffle(order)
        for name in order:
            m, routes, sizes = configs[name]
            times[name].append({**{f"decode b={b} tok/s": b * 32 / elapsed(lambda: run(m, routes, b)) for b in sizes},
                                "prefill tok/s": tokens / elapsed(lambda: m(**batches[16], **routing(routes, 16)))})
        rows = {name: {**{k: statistics.median(t[k] for t in ts) for k in ts[0]},
                       **{f"{k} / base": statistics.median(t[k] / base[k] for t, base in zip(ts, times["base"]))
                          for k in ts[0]}}
                for name, ts in times.items()}
        save(rows)
    return rows


def _speed_configs(model, tokenizer, library: Library, inputs: list[str]) -> dict:
    """{name: (model, routes for a batch of b or None, batch sizes)}: the base, one LoRA through peft, each router,
    and peft's own Arrow and X-LoRA (two passes, no KV cache) on the same experts, each on its own copy of the
    base model, the base's own included: in a run that timed the loaded model itself as the base, its copy
    decoded 3-7% faster (the loaded weights may still be mapped from their file; not checked). X-LoRA decodes at batch 1 only: with 62 experts
    its batch-16 decoding ran past 20 minutes on the 2-core CPU without finishing."""
    from peft import ArrowConfig, PeftModel, XLoraConfig, create_arrow_model, get_peft_model

    paths = [str(library.expert_path(n)) for n in library.names()]
    configs = {"base": (copy.deepcopy(model), None, (1, 16)),
               "base, a second copy (noise floor)": (copy.deepcopy(model), None, (1, 16)),
               "one LoRA (peft)": (PeftModel.from_pretrained(copy.deepcopy(model), paths[0]).eval(), None, (1, 16))}
    for kind in ("retrieval", "arrow", "gate"):
        k = None if kind == "gate" else 3  # the gate keeps its trained k
        router = Router(library, copy.deepcopy(model), tokenizer, RouterConfig(router=kind, k=k, fallback="never"))
        configs[f"{kind} top-{k or router.model.router.k} of {len(paths)}"] = (
            router.model, partial(lambda b, r: r.rows(inputs[:b]), r=router), (1, 16))
    arrow = create_arrow_model(copy.deepcopy(model), paths, ArrowConfig(top_k=3, router_temperature=1.0, rng_seed=0))
    configs[f"peft Arrow top-3 of {len(paths)}"] = (arrow.eval(), None, (1, 16))
    plain = copy.deepcopy(model)
    plain.config.use_cache = False  # X-LoRA refuses the KV cache: it runs the model twice per step
    xlora = get_peft_model(plain, XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, xlora_depth=1, top_k_lora=3,
        adapters={str(i): p for i, p in enumerate(paths)})).eval()  # peft names them "0", "1", ...: other keys fail
    configs[f"peft X-LoRA top-3 of {len(paths)}"] = (xlora, None, (1,))
    return configs


@torch.no_grad()
def scaling(model, tokenizer, library: Library, rounds: int = 5) -> dict:
    """Seconds for one routed forward (16 rows x 64 tokens) with K random experts on every q/v, dense rows
    (every weight nonzero) and top-3 rows, and each over a plain forward of the same round. Interleaved
    rounds in a freshly shuffled order (seeded), medians over rounds: one pass per K in a fixed order showed a
    slow spell of the machine as growth with K (scratch profile: the unrouted ops slowed with it)."""
    stack = load_stack(library, library.names()[:1]).modules
    ids = torch.randint(100, 1000, (16, 64))
    times: dict[str, list[float]] = {}
    order, shuffle = [8, 61, 200, None], random.Random(0).shuffle
    for _ in tqdm(range(rounds), desc="scaling rounds"):
        shuffle(order)
        round_s = {}
        for K in order:
            if K is None:
                round_s["plain forward s"] = median_time(lambda: model(input_ids=ids), 3)
                continue
            gen = torch.Generator().manual_seed(K)
            experts = {m: (torch.randn(K, *A.shape[1:], generator=gen) * 0.01,
                           torch.randn(K, *B.shape[1:], generator=gen) * 0.01) for m, (A, B) in stack.items()}
            dense = torch.softmax(torch.randn(16, K, generator=gen), -1)
            top3 = torch.zeros(16, K).scatter(1, torch.randint(0, K, (16, 3), generator=gen), 1 / 3)
            routed = RoutedModel(model, experts, "mixture")
            round_s[f"K={K} dense s"] = median_time(lambda: routed(input_ids=ids, routes=dense), 3)
            round_s[f"K={K} top-3 s"] = median_time(lambda: routed(input_ids=ids, routes=top3), 3)
            routed.remove()
        for name, seconds in round_s.items():
            times.setdefault(name, []).append(seconds)
            if name != "plain forward s":
                times.setdefault(name.replace(" s", " / plain"), []).append(seconds / round_s["plain forward s"])
    out = {name: round(statistics.median(values), 3) for name, values in sorted(times.items())}
    out["K=200 top-3 / K=8 top-3"] = round(statistics.median(
        a / b for a, b in zip(times["K=200 top-3 s"], times["K=8 top-3 s"])), 3)
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
    cosines = [float((layer.prototypes.float() * router.layer(i).prototypes).sum(-1).abs().min())
               for i, layer in layers.items()]
    for i, layer in layers.items():
        layer.prototypes = router.layer(i).prototypes.clone()
    shared = theirs(**batch).logits[mask]
    ours.remove()
    return {"experts": n, "max |logit diff|, peft's prototypes": float((mine - own).abs().max()),
            "max |logit diff|, same prototypes": float((mine - shared).abs().max()),
            "min |cos| ours vs peft prototype": min(cosines), "logit scale (max |logit|)": float(own.abs().max())}


def peft_arrow_layers(peft_model, module_names: list[str]) -> dict:
    """{our stack index: peft's arrow router layer} matched by module name (peft built its prototypes already)."""
    return {module_names.index(name.removeprefix("base_model.model.")): m.lora_arrow["arrow_router"]
            for name, m in peft_model.named_modules() if "arrow_router" in getattr(m, "lora_arrow", {})}


VALIDATION_ROWS = RESULTS / "route_bench.validation.rows.jsonl"
VALIDATION = [(1, 0.1), (3, 0.05), (3, 0.1), (3, 0.2)]
"""(k, temperature) of the retrieval router tried on the validation stream (k=1: the temperature does not act)."""
SYNTHESIZED = "every input synthesized"


@torch.no_grad()
def validation(model, tokenizer, library: Library, per_task: int, first: int = 10) -> dict:
    """The retrieval router's k and temperature, chosen on held-out examples first..first+per_task of every library
    task: disjoint from the stream's (the first --per-task), never trained on. Also each input through an adapter
    synthesized from it, with its best retrieval score: the in-domain half of the route fallback's calibration.
    Resumes per (task, configuration)."""
    cfg = EvalConfig(n_test=per_task, batch_size=16)
    span = {"first": first, "per_task": per_task}  # rows of another span are not these
    net = hypernet_id(library)
    done = {(r["task"], r.get("method") or (r["k"], r["temperature"])) for r in validation_rows(net, span)}
    router = Router(library, model, tokenizer, RouterConfig(router="retrieval", fallback="always"))
    for name, (task, test) in stream_tasks(library, first + per_task, first).items():
        todo = [c for c in (*VALIDATION, SYNTHESIZED) if (name, c) not in done]
        if not todo:
            continue
        inputs = [task.routing_text(ex) for ex in test]
        sims = router.impl.similarities(inputs)  # one embedding for every configuration
        for config in todo:
            if config == SYNTHESIZED:
                row = {"method": SYNTHESIZED, "best_score": sims.max(-1).values.tolist(), **net}
                routes = router.rows(inputs)
            else:
                row, routes = {"k": config[0], "temperature": config[1]}, top_k_softmax(sims, *config)
            row = {"task": name, **row, **span,
                   "correct": score(router.model, tokenizer, task, test, cfg=cfg, routes=routes)[0]}
            with VALIDATION_ROWS.open("a") as f:
                f.write(json.dumps(row) + "\n")
    router.remove()
    recorded = validation_rows(net, span)
    rows = [r for r in recorded if "k" in r]
    by_config = {(k, t): [statistics.mean(r["correct"]) for r in rows if (r["k"], r["temperature"]) == (k, t)]
                 for k, t in VALIDATION}
    acc = {config: statistics.mean(v) for config, v in by_config.items() if v}
    synthesized = [statistics.mean(r["correct"]) for r in recorded if r.get("method") == SYNTHESIZED]
    return {"tasks": len({r["task"] for r in rows}), "examples": f"held-out {first}..{first + per_task} a task",
            **{f"retrieval k={k}" + (f" T={t}" if k > 1 else "") + " accuracy": v for (k, t), v in acc.items()},
            **({f"{SYNTHESIZED} accuracy": statistics.mean(synthesized)} if synthesized else {}),
            "chosen k": max(acc, key=acc.get)[0]}


def validation_rows(net: dict, span: dict | None = None) -> list[dict]:
    """The validation rows of one span (default: the stream's default, examples 10..30), the synthesized ones
    by the hypernetwork `net` (`hypernet_id`)."""
    span = span or {"first": 10, "per_task": 20}
    return [r for r in made_by(read_rows(VALIDATION_ROWS), {SYNTHESIZED}, net) if r.items() >= span.items()]


def unseen_rows(net: dict) -> list[dict]:
    """The unseen section's rows, the synthesized ones by the hypernetwork `net` (`hypernet_id`)."""
    return made_by(read_rows(UNSEEN_ROWS), {SYNTHESIZED}, net)


STREAM = {"retrieval": RouterConfig(router="retrieval"), "retrieval top-3": RouterConfig(router="retrieval", k=3),
          "arrow": RouterConfig(router="arrow"), "gate": RouterConfig(router="gate")}
"""Routers of the stream, as users get them (defaults, the calibrated fallback), and retrieval mixing its top 3."""


@torch.no_grad()
def stream(model, tokenizer, library: Library, per_task: int, routers: list[str] = list(STREAM)) -> dict:
    """Held-out examples of every library task as one stream: accuracy per method (mean over tasks) and how often
    the top-1 expert is the example's own. Each router runs as users get it (`Router`, its calibrated route
    fallback included: in-domain inputs should rarely fall back); fixed rows go through the first router's
    model (zeros: the base model; 1/K: the uniform average; one-hot: the task's own expert)."""
    names, K = library.names(), len(library.names())
    cfg = EvalConfig(n_test=per_task, batch_size=16)
    tasks = stream_tasks(library, per_task)
    acc, top1, fell_back = {}, {}, []
    for kind in routers:
        router = Router(library, model, tokenizer, STREAM[kind])
        for name, (task, test) in tasks.items():
            i, n, inputs = names.index(name), len(test), [task.routing_text(ex) for ex in test]
            rows = router.rows(inputs)
            methods = {kind: rows}
            if not router.impl.per_token:  # per input: a row that fell back is all zeros, not its own expert
                top1.setdefault(kind, []).extend((rows.weights.argmax(-1) == i).tolist())
            else:
                top1.setdefault(kind, []).extend(
                    int(mean_token_weights(router.model, tokenizer, task.build_prompt(ex)).argmax()) == i for ex in test)
            if kind == "retrieval":
                methods |= {"zero-shot": torch.zeros(n, K), "uniform": torch.full((n, K), 1 / K),
                            "oracle": torch.nn.functional.one_hot(torch.full((n,), i), K).float()}
                fell_back += (rows.weights.abs().sum(-1) == 0).tolist()
            for method, routes in methods.items():
                acc.setdefault(method, []).append(_acc(score(router.model, tokenizer, task, test, cfg=cfg, routes=routes)))
            print(kind, name, {m: round(v[-1], 3) for m, v in acc.items()}, flush=True)
        model = router.remove()
    table = {m: statistics.mean(v) for m, v in acc.items()}
    result = {"tasks": len(tasks), "examples per task": per_task, **{f"{m} accuracy": v for m, v in table.items()},
              **{f"{m} top-1 = own expert": statistics.mean(v) for m, v in top1.items()}}
    if "retrieval" in routers:
        best = max(routers, key=table.get)
        result |= {"retrieval: inputs that fell back": statistics.mean(fell_back), "best router": best,
                   "best router / oracle": table[best] / table["oracle"],
                   "best router - uniform": table[best] - table["uniform"]}
    return result


def _acc(scored) -> float:
    correct = scored[0]
    return sum(correct) / len(correct)


UNSEEN_ROWS = RESULTS / "route_bench.unseen.rows.jsonl"
UNSEEN = {"zero-shot": None, "retrieval": RouterConfig(router="retrieval", fallback="never"),
          "retrieval top-3": RouterConfig(router="retrieval", k=3, fallback="never"),
          SYNTHESIZED: RouterConfig(router="retrieval", fallback="always"),
          "arrow": RouterConfig(router="arrow", fallback="never"), "gate": RouterConfig(router="gate", fallback="never")}
"""Methods of the unseen section (None: the base model); the retrieval rows also keep each input's best score."""


@torch.no_grad()
def unseen(model, tokenizer, library: Library, n_test: int, calibrate_route: bool = False) -> dict:
    """Dev tasks (no expert trained on them), each test example routed on its own input (the task's name and
    description never seen), into a rows file that resumes per (task, method). Also calibrates the route
    fallback: per input, the synthesized adapter below a threshold on its best retrieval score."""
    cfg = EvalConfig(n_test=n_test, seed=0)
    tasks = {name: load_task(resolve_task(name)) for name in dev_tasks()}
    tests = {name: eval_split(task, cfg)[1] for name, task in tasks.items()}
    net = hypernet_id(library)
    done = {(r["task"], r["method"]) for r in unseen_rows(net)}
    for method, router_cfg in UNSEEN.items():  # one router per method; the rows file resumes per (task, method)
        todo = [name for name in tests if (name, method) not in done]
        if not todo:
            continue
        router = Router(library, model, tokenizer, router_cfg) if router_cfg else None
        for name in todo:
            task, test = tasks[name], tests[name]
            inputs = [task.routing_text(ex) for ex in test]
            row = {"task": name, "method": method, "correct": score(
                router.model if router else model, tokenizer, task, test, cfg=cfg,
                routes=router.rows(inputs) if router else None)[0]}
            if method == "retrieval":
                row["best_score"] = router.impl.similarities(inputs).max(-1).values.tolist()
            row.update(net if method == SYNTHESIZED else {})
            with UNSEEN_ROWS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(method, name, round(statistics.mean(row["correct"]), 3), flush=True)
        if router:
            model = router.remove()
    return unseen_summary(library, calibrate_route)


def unseen_summary(library: Library, calibrate_route: bool = False) -> dict:
    """Per method: the tasks measured so far, mean accuracy there and zero-shot's on the same tasks, wins and
    losses against it; and the route fallback calibrated on the tasks that have both retrieval columns."""
    net = hypernet_id(library)
    rows = {(r["task"], r["method"]): r for r in unseen_rows(net)}
    acc = {key: statistics.mean(r["correct"]) for key, r in rows.items()}
    out = {}
    for m in UNSEEN:
        done = [t for t in dev_tasks() if (t, m) in acc and (t, "zero-shot") in acc]
        if done:
            diff = [acc[t, m] - acc[t, "zero-shot"] for t in done]
            out[m] = {"tasks": len(done), "mean accuracy": statistics.mean(acc[t, m] for t in done),
                      "zero-shot on the same tasks": statistics.mean(acc[t, "zero-shot"] for t in done),
                      "wins / losses vs zero-shot": f"{sum(d > 0 for d in diff)} / {sum(d < 0 for d in diff)}"}
    out.update(against_compose(acc))
    unseen_units = {t: (rows[t, "retrieval"]["best_score"], rows[t, SYNTHESIZED]["correct"], rows[t, "retrieval"]["correct"])
                    for t in dev_tasks() if (t, "retrieval") in rows and (t, SYNTHESIZED) in rows}
    inside = in_domain_units(net)
    if unseen_units:
        # one threshold for every input a router sees: unseen tasks' and the library's own (validation span)
        fallback = out["route fallback"] = calibrate({**unseen_units, **inside})
        alone = calibrate(unseen_units)
        fallback.update({
            "calibrated on": f"{len(unseen_units)} unseen dev tasks + {len(inside)} library tasks (held-out 10..30)",
            "unseen tasks alone would pick": alone["threshold"],
            **{f"{group}: mean at it / never": f"{fallback_mean(units, fallback['threshold']):.3f} / "
                                               f"{fallback_mean(units, 0.0):.3f}"
               for group, units in (("unseen tasks", unseen_units), ("library tasks", inside)) if units}})
        if calibrate_route:
            set_fallback_threshold(library, fallback["adopted"], {
                **fallback, "calibrated_on": [*unseen_units, *inside], "by": "benchmarks/route_bench.py --calibrate"},
                "route")
        fallback["stored with the hypernetwork"] = fallback_threshold(library, "route")
        fallback["in-domain stream inputs below it"] = stream_below(library, fallback["threshold"])
    return out


def in_domain_units(net: dict) -> dict:
    """{library task: (best retrieval scores, correct with the adapter synthesized from each input, correct with its
    closest expert)} on the validation span, for the tasks that have both rows."""
    rows = validation_rows(net)
    closest = {r["task"]: r["correct"] for r in rows if r.get("k") == 1}
    return {r["task"]: (r["best_score"], r["correct"], closest[r["task"]])
            for r in rows if r.get("method") == SYNTHESIZED and r["task"] in closest}


def fallback_mean(units: dict, threshold: float) -> float:
    """Mean over tasks of the per-task accuracy when inputs scoring below `threshold` take the synthesized adapter."""
    return statistics.mean(statistics.mean(w if s < threshold else wo for s, w, wo in zip(*u)) for u in units.values())


def stream_below(library: Library, threshold: float, per_task: int = 10) -> str:
    """How many of the in-domain stream's inputs (the first `per_task` held-out examples of each library task) have
    their best retrieval score below `threshold`: the inputs a stored route threshold would send to a synthesized
    adapter instead of an expert."""
    retrieval = RetrievalRouter(library, library.names(), None, RouterConfig())
    inputs = [task.routing_text(ex) for task, test in stream_tasks(library, per_task).values() for ex in test]
    below = int((retrieval.similarities(inputs).max(-1).values < threshold).sum())
    return f"{below} of {len(inputs)}"


def against_compose(acc: dict) -> dict:
    """compose's default (compose_bench's rows: 5 labelled shots, mean over its shot seeds; its test sets are these,
    split seed 0 and 50 examples, so its zero-shot rows equal ours task for task) against each router on the dev
    tasks compose_bench ran, per regime: `near` composes from the whole library, as the routers route; `far` from a
    library without the task's family and its close experts."""
    out = {}
    compose_rows = [r for r in read_rows(RESULTS / "compose_bench.rows.jsonl") if r["method"] == COMPOSE]
    for regime in ("near", "far"):
        by_task = {}
        for r in compose_rows:
            if r.get("regime", "near") == regime:
                by_task.setdefault(r["task"], []).append(r["accuracy"])
        tasks = [t for t in dev_tasks() if t in by_task and all((t, m) in acc for m in UNSEEN)]
        if tasks:
            out[f"compose, {regime} ({COMPOSE}, 5 shots)"] = {
                "tasks": len(tasks), "mean accuracy": statistics.mean(statistics.mean(by_task[t]) for t in tasks),
                **{f"{m} on the same tasks": statistics.mean(acc[t, m] for t in tasks) for m in UNSEEN}}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", nargs="+", default=["speed", "scaling", "parity", "validation", "unseen", "stream"])
    parser.add_argument("--per-task", type=int, default=10)
    parser.add_argument("--routers", nargs="+", choices=list(STREAM), default=list(STREAM),
                        help="stream: only these routers (the base, uniform and oracle rows come with retrieval)")
    parser.add_argument("--rounds", type=int, default=5, help="speed, scaling: interleaved timing rounds (medians)")
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--calibrate", action="store_true",
                        help="store the route fallback threshold (unseen and validation rows together) with the hypernetwork")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report (unseen: from its rows file)")
    args = parser.parse_args()
    library = Library(REPO_ROOT / "library")
    parts = json.loads(PARTS.read_text()) if PARTS.exists() else {}
    if args.report_only:
        parts["unseen"] = unseen_summary(library, args.calibrate)
        PARTS.write_text(json.dumps(parts, indent=1) + "\n")
        args.sections = []
    else:
        model, tokenizer = load_base_model()
    for section in args.sections:
        fn = {"speed": speed, "scaling": scaling, "parity": parity, "validation": validation, "stream": stream,
              "unseen": unseen}[section]
        extra = {"stream": {"per_task": args.per_task, "routers": args.routers}, "validation": {"per_task": 2 * args.per_task, "first": args.per_task},
                 "unseen": {"n_test": args.n_test, "calibrate_route": args.calibrate}, "scaling": {"rounds": args.rounds},
                 "speed": {"rounds": args.rounds,
                           "save": lambda rows: PARTS.write_text(json.dumps({**parts, "speed": rows}, indent=1) + "\n")}
                 }.get(section, {})
        parts[section] = fn(model, tokenizer, library, **extra)
        PARTS.write_text(json.dumps(parts, indent=1) + "\n")
    rows = [{"configuration": name, **values} for name, values in parts.get("speed", {}).items()]
    summary = {f"{section}: {k}": v for section in ("scaling", "parity", "validation", "stream")
               for k, v in parts.get(section, {}).items()}
    summary.update({f"unseen: {m}: {k}": v for m, values in parts.get("unseen", {}).items() for k, v in values.items()})
    plot(parts, RESULTS / "route_bench.png")
    command = ["--report-only"] if args.report_only else [
        "--sections", *args.sections, "--per-task", str(args.per_task), "--n-test", str(args.n_test),
        "--rounds", str(args.rounds)] + (["--routers", *args.routers] if args.routers != list(STREAM) else [])
    print(write_results("route_bench", rows, summary, "python benchmarks/route_bench.py " + " ".join(
        command + (["--calibrate"] if args.calibrate else [])),
        "Speed rows: greedy decoding of 32 new tokens and one prefill forward of 16 prompts, each configuration on its "
        "own copy of the model, --rounds interleaved rounds, each in a freshly shuffled order (seeded); a ratio is "
        "the median over rounds of each round's tokens/s over the base's in that round; the base's second copy "
        "gives the noise floor. "
        "Parts measured by earlier runs of other sections are kept (results/route_bench.parts.json)."))


def plot(parts: dict, path: Path) -> None:
    """Speed ratios to the base model, and accuracy per method on the stream and on unseen tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("speed", {n: r.get("decode b=1 tok/s / base") for n, r in parts.get("speed", {}).items()},
               "decode tok/s, batch 1, / base")]
    panels.append(("stream", {k.removesuffix(" accuracy"): v for k, v in parts.get("stream", {}).items()
                              if k.endswith(" accuracy")}, "in-domain stream: mean accuracy"))
    panels.append(("unseen dev tasks", {f"{m} ({v['tasks']} tasks)": v["mean accuracy"] for m, v in
                                        parts.get("unseen", {}).items() if "mean accuracy" in v}, "mean accuracy"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, values, label) in zip(axes, panels):
        values = {k: v for k, v in values.items() if v is not None}
        ax.barh(list(values), list(values.values()), color="tab:blue")
        for i, v in enumerate(values.values()):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel=label, title=title)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
