"""`lorahub-plus`: a thin command line over the Python API. Every command takes --json."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from lorahub_plus.library.atomic import check_output_dir
from lorahub_plus.errors import LibraryError, LoraHubPlusError
from lorahub_plus.paths import REPO_ROOT, default_library, resolve_task


def _emit(args, payload, text: str) -> None:
    print(json.dumps(payload, indent=2) if args.json else text)


def _config_from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None})


def _add_config_flags(parser, cls, skip=(), choices: dict | None = None):
    """One --flag per config field, help from the field's metadata (defaults stay in the config)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = ("-" if len(f.name) == 1 else "--") + f.name.replace("_", "-")
        help_ = (f.metadata.get("help") + ("" if f.default is None else f" (default {f.default})")).replace("%", "%%")
        if typing.get_origin(hints[f.name]) is typing.Literal or f.name in (choices or {}):
            options = (choices or {}).get(f.name) or typing.get_args(hints[f.name])
            parser.add_argument(flag, dest=f.name, choices=sorted(options), help=help_)
        elif f.name == "target_modules":
            parser.add_argument(flag, dest=f.name, nargs="+", help=help_)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            kind = type(f.default) if f.default is not None else \
                next(t for t in typing.get_args(hints[f.name]) if t is not type(None))  # `int | None`: int
            parser.add_argument(flag, dest=f.name, type=kind, help=help_)


def _hits_payload(hits):
    return [{"name": h.name, "score": round(h.score, 4), "description": h.card.description,
             "source_task": h.card.source_task, "metrics": h.card.metrics} for h in hits]


def _hits_text(hits) -> str:
    rows = [f"{i + 1:>2}. {h.score:6.3f}  {h.name:<45} {h.card.description[:70]}" for i, h in enumerate(hits)]
    return "\n".join(rows) or "(no experts)"


def cmd_search(args):
    from lorahub_plus.hub import Hub

    hits = Hub(args.library).search(args.query, args.k)
    _emit(args, _hits_payload(hits), _hits_text(hits))


def cmd_eval(args):
    from lorahub_plus.scoring import EvalConfig
    from lorahub_plus.evaluation import evaluate, method_options
    from lorahub_plus.library.store import Library
    from lorahub_plus.models import load_base_model
    from lorahub_plus.tasks import load_task

    task = load_task(resolve_task(args.task))
    model, tokenizer = load_base_model(args.base_model)
    library = Library(args.library) if "library" in method_options(args.method) else None
    cfg = _config_from_args(EvalConfig, args)
    result = evaluate(model, tokenizer, task, args.method, cfg, progress=not args.json, adapter=args.adapter,
                      library=library)
    r = result.to_dict()
    text = (f"{r['task']} [{r['method']}] accuracy {r['accuracy']:.3f} ({r['correct']}/{r['n']}), "
            f"{r['input_tokens_per_example']:.1f} input tokens/example, {r['tokens']} tokens, {r['wall_s']:.1f} s")
    if r["n"] < r["n_asked"]:
        rest = len(task.examples) - r["n"]
        text += (f"\nonly {r['n']} test examples of the {r['n_asked']} asked for: the task has "
                 f"{len(task.examples)} examples" + (f", {rest} kept out of the test set for the shots (--shots; every "
                                                     "method is tested on the same split, --shots 0 tests them all)"
                                                     if rest else ""))
    for p in r["predictions"][: args.show]:
        text += (f"\n{'ok ' if p['correct'] else 'bad'}  {_clip(p['input'])!s:<60}  -> {_clip(p['prediction'], 40)}"
                 + ("" if p["correct"] else f"   (expected {_clip(p['targets'][0], 40)})"))
    _emit(args, r, text)


def _clip(text: str, width: int = 60) -> str:
    """One line of at most `width` characters, control characters escaped, for the terminal."""
    line = repr(text)[1:-1] if any(not c.isprintable() for c in text) else text
    return line if len(line) <= width else line[: width - 3] + "..."


NO_ADAPTER = 3
"""Exit status of `compose` when no candidate beat the base model: no adapter was written."""


def cmd_compose(args):
    from lorahub_plus.compose.config import ComposeConfig
    from lorahub_plus.hub import Hub
    from lorahub_plus.tasks import load_task

    names = None
    if args.candidates != "retrieve":
        names = [n.strip() for n in args.candidates.split(",") if n.strip()]
        if not names or args.candidates == "random":  # LoraHub's random draw is a benchmark `Variant`, not an option
            raise ValueError(f"`--candidates` must be retrieve or expert names, got {args.candidates!r}")
    options = dataclasses.asdict(_config_from_args(ComposeConfig, args))  # checked before the model loads
    task = load_task(args.examples)
    hub = Hub(args.library, args.base_model)
    result = hub.compose(task, args.description, args.out, args.overwrite, progress=not args.json, names=names,
                         **options)
    _emit(args, result.to_dict(), _composition_text(result, hub.library, len(task.examples)))
    if result.base_won:
        sys.exit(NO_ADAPTER)


def _composition_text(result, library, shots: int) -> str:
    used = sorted(((w, n) for n, w in result.expert_weights().items()), reverse=True)
    best = "\n".join(f"  {c['gain'] or float('nan'):+.3f} +- {c['se'] or float('nan'):.3f}  {c['name']:<45} "
                      f"{library.path / c['name']}" for c in result.candidates)
    lines = [f"{shots} shots, {len(result.names)} candidates, {result.evaluations} evaluations in "
             f"{result.seconds:.1f} s; loss {result.loss:.4f} (base model {result.base_loss:.4f})"]
    if result.base_won:
        lines.append(f"no adapter: no candidate beat the base model ({result.base_test} test)"
                     + (f"; wrote only {result.out}/report.json" if result.out else ""))
    else:
        lines.append((f"wrote {result.out}: " if result.out else "") + ", ".join(f"{n} {w:+.3f}" for w, n in used))
    if best:
        lines.append("best single candidates, mean gain per shot over the base model (a library expert is a PEFT "
                     "adapter you can use as it is):\n" + best)
    return "\n".join(lines)


def read_inputs(path: Path) -> list[str]:
    """Inputs to route: a JSONL file of objects with a string `input` (other fields are ignored)."""
    from lorahub_plus.library.readers import check_field, parse_json, read_text

    inputs = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            where = f"{path}: line {lineno}"
            inputs.append(check_field(parse_json(line, where).get("input"), str, where, "input", LibraryError))
            if not inputs[-1].strip():
                raise LibraryError(f"{where}: field `input` is empty")
    if not inputs:
        raise LibraryError(f"{path}: no inputs (expected one JSON object with an `input` a line)")
    return inputs


ROUTE_BATCH, ROUTE_TOKENS = 16, 4096
"""Inputs routed and answered per batched generate, grouped by length: at most 16, and at most 4,096 tokens with
padding (one long input goes alone)."""


def cmd_route(args):
    from tqdm.auto import tqdm

    from lorahub_plus.encode import length_batches
    from lorahub_plus.hub import Hub
    from lorahub_plus.routing.routers import RouterConfig

    if (args.text is None) == (args.inputs is None):
        raise ValueError("give one input as text, or `--inputs FILE.jsonl`, not both")
    inputs = [args.text] if args.text is not None else read_inputs(args.inputs)
    options = dataclasses.asdict(_config_from_args(RouterConfig, args))  # checked before the model loads
    hub = Hub(args.library, args.base_model)
    router, tokenizer = hub.router(options.pop("router"), **options), hub.tokenizer
    rows = [None] * len(inputs)
    lengths = [len(ids) for ids in tokenizer(inputs, add_special_tokens=False)["input_ids"]]
    batches = length_batches(lengths, ROUTE_BATCH, ROUTE_TOKENS)  # a long input pads no short one
    for batch in tqdm(batches, desc="routing", unit="batch", disable=args.json or len(batches) == 1):
        chunk = [inputs[i] for i in batch]
        for i, text, used, out in zip(batch, chunk, router.explain(chunk), router.generate(chunk, args.max_new_tokens)):
            rows[i] = {"input": text, "experts": [{"name": n, "weight": round(w, 4)} for n, w in used], "output": out}
    _emit(args, rows, "\n\n".join(f"{_clip(r['input'], 100)}\n  " + ", ".join(
        f"{e['name']} {e['weight']:.2f}" for e in r["experts"][:5]) + f"\n  -> {r['output']}" for r in rows))


def cmd_gate(args):
    from lorahub_plus.routing.gate import GateConfig, build_gate
    from lorahub_plus.library.store import Library
    from lorahub_plus.models import load_base_model
    from lorahub_plus.library.readers import read_json

    library = Library(args.library)
    model, tokenizer = load_base_model(args.base_model or library.meta.get("load_from"))
    folder = build_gate(library, model, tokenizer, _config_from_args(GateConfig, args), progress=not args.json)
    meta = read_json(folder / "gate.json")
    losses = meta["losses"]
    _emit(args, {k: v for k, v in meta.items() if k != "losses"} | {"first loss": losses[0], "last loss": losses[-1]},
          f"wrote {folder}: {len(meta['experts'])} experts, {len(losses)} steps in {meta['train_seconds']:.0f} s, "
          f"loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} (mean of the last 10 steps)")


def cmd_hypernet(args):
    from lorahub_plus.library.build import read_task_list
    from lorahub_plus.hypernet.network import HypernetConfig
    from lorahub_plus.hypernet.training import HypernetTrainConfig, build_hypernet
    from lorahub_plus.library.store import Library
    from lorahub_plus.models import load_base_model
    from lorahub_plus.paths import data_dir
    from lorahub_plus.library.readers import read_json

    library = Library(args.library)
    train_cfg = _config_from_args(HypernetTrainConfig, args)  # bad settings fail before the model loads
    held_out = read_task_list(args.exclude)
    model, tokenizer = load_base_model(args.base_model or library.meta.get("load_from"))
    folder = build_hypernet(library, model, tokenizer, args.tasks or data_dir(), held_out, args.work,
                            _config_from_args(HypernetConfig, args), train_cfg, progress=not args.json)
    meta = read_json(folder / "hypernet.json")
    last = {name: round(sum(v[-10:]) / len(v[-10:]), 4) for name, v in meta["losses"].items() if v}
    _emit(args, {k: v for k, v in meta.items() if k != "losses"} | {"last_losses": last},
          f"wrote {folder}: {meta['metrics']['n_training_tasks']} training tasks, "
          + (f"{len(meta['reconstruction_experts'])} experts reconstructed, " if "reconstruction" in meta["losses"] else "")
          + f"anchor {meta['train_config']['anchor'] or 'the experts mean'}, "
          f"{meta['metrics']['train_seconds']:.0f} s; mean loss of the last 10 steps {last}; "
          f"reconstruction error {meta['metrics']['reconstruction_error']:.3f}"
          + (f"; validation ({len(val['families'])} families): lowest loss {val['best']['loss']:.4f} at "
             f"{val['best']['phase']} step {val['best']['step']}, kept (base model {val['base_model_loss']:.4f})"
             if (val := meta.get("validation")) else ""))


def cmd_train_multitask(args):
    from lorahub_plus.library.build import read_task_list
    from lorahub_plus.hypernet.training import HypernetTrainConfig, training_tasks
    from lorahub_plus.library.store import Library
    from lorahub_plus.models import load_base_model
    from lorahub_plus.paths import data_dir
    from lorahub_plus.library.train import TrainConfig, train_multitask

    # train_multitask checks these again, but only after the task selection (minutes) and the model load here
    check_output_dir(args.out, args.overwrite)
    if args.per_task < 1:
        raise ValueError(f"`--per-task` must be >= 1, got {args.per_task}")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    cfg = TrainConfig(**{"epochs": 1, **given})  # one pass over the mix unless told otherwise
    library = Library(args.library)
    selection = HypernetTrainConfig(validation=args.validation)  # the baseline sees what the hypernetwork sees
    tasks = list(training_tasks(args.tasks or data_dir(), read_task_list(args.exclude), selection,
                                library.embedder)[0].values())
    model, tokenizer = load_base_model(args.base_model or library.meta.get("load_from"))
    card = train_multitask(tasks, args.out, cfg, args.per_task, model, tokenizer, progress=not args.json,
                           overwrite=args.overwrite)
    _emit(args, dataclasses.asdict(card), f"wrote {args.out}: {len(tasks)} tasks, {card.metrics['n_train']} examples, "
          f"{card.metrics['train_seconds']:.0f} s, final loss {card.metrics['final_loss']:.3f}")


def cmd_synthesize(args):
    from lorahub_plus.library.store import Library
    from lorahub_plus.hypernet.synthesize import read_examples, synthesize

    if not args.description and not args.examples:  # before the hypernetwork loads; names the flags
        raise ValueError("give `--description`, `--examples`, or both")
    if args.replace and not args.add_to_library:
        raise ValueError("`--replace` replaces a library expert: give it with `--add-to-library NAME`")
    examples = read_examples(args.examples) if args.examples else None
    card = synthesize(args.description, examples, args.out, Library(args.library), args.add_to_library,
                      overwrite=args.overwrite, replace=args.replace)
    where = " and ".join(x for x in (str(args.out) if args.out else "", f"library expert `{args.add_to_library}`"
                                     if args.add_to_library else "") if x)
    _emit(args, dataclasses.asdict(card), f"wrote {where}: rank {card.rank} on {len(card.modules)} modules, "
          f"synthesized from {'the description' if args.description else ''}"
          f"{' and ' if args.description and examples else ''}{f'{len(examples)} examples' if examples else ''}")


def cmd_train_expert(args):
    from lorahub_plus.models import load_base_model
    from lorahub_plus.tasks import load_task
    from lorahub_plus.library.train import TrainConfig, train_expert

    task = load_task(resolve_task(args.task))
    model, tokenizer = load_base_model(args.base_model)
    card = train_expert(task, args.out, _config_from_args(TrainConfig, args), model, tokenizer, progress=not args.json,
                        overwrite=args.overwrite)
    m = card.metrics
    _emit(args, dataclasses.asdict(card), f"wrote {args.out}: {task.name} base {m['base_accuracy']:.3f} -> "
                                          f"expert {m['expert_accuracy']:.3f} on {m['n_test']} held-out examples")


def cmd_library(args):
    from lorahub_plus.library.store import Library

    if args.action == "init":
        from lorahub_plus.models import load_base_model

        lib = Library.create(args.library, load_base_model(args.base_model)[0], load_from=args.base_model)
        return _emit(args, {"path": str(lib.path), "base_model": lib.base_model}, f"created {lib.path}")
    if args.action == "build":
        return _build(args)
    lib = Library(args.library, recover=args.action not in ("verify", "repair"))  # those two see it as found
    if args.action == "add":
        examples = None
        if args.examples:
            from lorahub_plus.tasks import load_task

            few = load_task(args.examples)
            examples = [few.routing_text(ex) for ex in few.examples]
        card = lib.add(args.source, name=args.name, description=args.description, keywords=args.keywords,
                       examples=examples, replace=args.replace, base_model_mismatch=args.base_model_mismatch == "ok")
        _emit(args, dataclasses.asdict(card), f"added {card.name}")
    elif args.action == "remove":
        lib.remove(args.name)
        _emit(args, {"removed": args.name}, f"removed {args.name}")
    elif args.action == "list":
        cards = lib.cards()
        rows = [f"{c.name:<50} r={c.rank:<3} base {c.metrics.get('base_accuracy', float('nan')):.3f} "
                f"expert {c.metrics.get('expert_accuracy', float('nan')):.3f}" for c in cards]
        _emit(args, [dataclasses.asdict(c) for c in cards], "\n".join(rows) or "(empty library)")
    elif args.action == "show":
        card = lib.card(args.name)
        _emit(args, dataclasses.asdict(card), card.to_json())
    elif args.action == "verify":
        problems = lib.verify()
        _emit(args, {"ok": not problems, "experts": len(lib), "problems": problems},
              "\n".join(problems) if problems else f"ok: {len(lib)} experts verified")
        if problems:
            sys.exit(1)
    elif args.action == "repair":
        done = lib.repair()
        _emit(args, {"repaired": done}, "\n".join(done) or "nothing to repair")
    elif args.action == "reindex":
        lib.reindex()
        _emit(args, {"reindexed": len(lib)}, f"reindexed {len(lib)} experts")
    elif args.action == "calibrate":
        from lorahub_plus.library.calibrate import calibrate_close

        entry = calibrate_close(lib, progress=not args.json)
        _emit(args, {"close": entry}, f"close = {entry['value']} (from {entry['evidence']['tasks']} of the library's "
              f"tasks; stored in {lib.path / 'calibration.json'})")
    elif args.action == "summary":
        from lorahub_plus.library.build import write_summary

        readme = write_summary(lib)
        _emit(args, {"readme": str(readme)}, f"wrote {readme} and {readme.parent / 'accuracy.png'}")


def _build(args):
    from lorahub_plus.library.build import Selection, build_library, read_task_list, write_summary
    from lorahub_plus.library.store import LIBRARY_FILE, Library

    index, _, count = args.shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"`--shard` must be I/N with 0 <= I < N, got {args.shard!r}")
    selection = Selection.read(args.select, read_task_list(args.exclude) if args.exclude else set())  # before any write
    out = args.out or args.library
    if not (out / LIBRARY_FILE).is_file():
        from lorahub_plus.models import load_base_model

        model = load_base_model()[0]
        if not (out / LIBRARY_FILE).is_file():  # a parallel shard may have created it meanwhile
            Library.create(out, model)
    lib = Library(out)
    if args.ray is not None:
        from lorahub_plus.library.build import build_library_ray

        report = build_library_ray(selection, lib, args.tasks, None if args.ray == "local" else args.ray,
                                   args.cpus_per_task, progress=not args.json)
    else:
        report = build_library(selection, lib, args.tasks, progress=not args.json, shard=(int(index), int(count)))
    write_summary(lib)
    built = [r for r in report if r["status"] == "built"]
    failed = [r for r in report if r["status"].startswith("failed")]
    _emit(args, report, f"built {len(built)} experts, {len(report) - len(built) - len(failed)} already there, "
                        f"{len(failed)} failed; library {lib.path} holds {len(lib)}")
    if failed:
        sys.exit(1)


def cmd_serve(args):
    if args.ray is not None:
        from lorahub_plus.serving.ray import serve_on_ray

        return serve_on_ray(None if args.ray == "local" else args.ray, args.library, args.host, args.port,
                            args.api_key, args.base_model, args.max_batch, args.replicas, args.cpus_per_replica)
    from lorahub_plus.serving.app import serve

    serve(args.library, args.host, args.port, args.api_key, args.base_model, args.max_batch)


def cmd_demo(args):
    """Search the default library, then compare the base model and the found expert on its task."""
    from lorahub_plus.scoring import EvalConfig
    from lorahub_plus.evaluation import evaluate
    from lorahub_plus.library.store import Library
    from lorahub_plus.models import load_base_model
    from lorahub_plus.tasks import load_task

    lib = Library(args.library)
    queries = ["add two numbers", "decide whether a claim is true", "understand the emotion in a review"]
    report = {"library": str(lib.path), "experts": len(lib), "searches": {}}
    for query in queries:
        hits = lib.search(query, 3)
        report["searches"][query] = _hits_payload(hits)
        if not args.json:
            print(f'\nsearch "{query}"\n{_hits_text(hits)}')
    if not len(lib):
        raise LibraryError(f"{lib.path} holds no experts; build some with `lorahub-plus library build`")
    best = next((hit for hit in lib.search(queries[0], len(lib)) if hit.card.source_task), None)
    if best is None:
        raise LibraryError(f"{lib.path}: no expert trained on a task of its own to evaluate; build some with "
                           "`lorahub-plus library build`")
    model, tokenizer = load_base_model()
    task = load_task(resolve_task(best.card.source_task))
    cfg = EvalConfig(n_test=args.n_test, seed=best.card.metrics.get("split_seed", 0))
    results = [evaluate(model, tokenizer, task, "zero-shot", cfg).to_dict(),
               evaluate(model, tokenizer, task, "adapter", cfg, adapter=lib.expert_path(best.name)).to_dict()]
    report["evaluation"] = results
    if not args.json:
        print(f"\neval on {task.name} ({results[0]['n']} held-out examples)")
        for r in results:
            print(f"  {r['method']:<10} accuracy {r['accuracy']:.3f}  ({r['wall_s']:.1f} s)")
    from lorahub_plus.routing.routers import Router, RouterConfig

    stream = ["What is 23 plus 19?", "restaurant", "2015-02-01"]  # inputs of three different library tasks
    router = Router(lib, model, tokenizer, RouterConfig(k=2))
    report["routing"] = [{"input": text, "experts": [{"name": n, "weight": round(w, 3)} for n, w in used]}
                         for text, used in zip(stream, router.explain(stream, chat=False))]
    router.remove()
    question = "What is 47 plus 38?"  # a plain question, as a person types it
    router = Router(lib, model, tokenizer)
    report["question"] = {"input": question, "answer": router.generate([question])[0],
                          "experts": [{"name": n, "weight": round(w, 3)} for n, w in router.explain([question])[0]]}
    router.remove()
    if not args.json:
        print("\nroute a mixed stream (retrieval, top-2 experts per input)")
        for row in report["routing"]:
            print(f"  {row['input']!r:<24} " + ", ".join(f"{e['name']} {e['weight']:.2f}" for e in row["experts"]))
        q = report["question"]
        print(f"\nask a plain question (lorahub-plus route {question!r})\n  "
              + ", ".join(f"{e['name']} {e['weight']:.2f}" for e in q["experts"]) + f"\n  -> {q['answer']}")
    else:
        print(json.dumps(report, indent=2))


COMMANDS = {
    "search": "find experts by task description",
    "eval": "evaluate a method on a task's held-out split",
    "compose": "compose library experts from a few examples",
    "route": "route inputs to their experts and generate",
    "gate": "the library's learned router",
    "hypernet": "the library's hypernetwork (Text-to-LoRA)",
    "train-multitask": "train one LoRA on the hypernetwork's training tasks, mixed (T2L's baseline)",
    "synthesize": "write an adapter from a description (Text-to-LoRA)",
    "train-expert": "train a LoRA expert on one task",
    "library": "manage an adapter library",
    "serve": "serve the library behind an OpenAI-compatible API",
    "demo": "search the default library and evaluate an expert",
}
"""Each command's one line, for `--help` (answered without importing the commands' modules)."""


TASK_FILES = ("A task is a BIG-bench task file (.json), whose examples keep the task's own prefixes (`\\nQ: ` and "
              "`\\nA: ` by default), a task name in ../shared/data/bigbench, or a JSONL file of plain examples, "
              "{\"input\": \"What is 47 plus 38?\", \"target\": \"85\"} a line (optional \"choices\": [...]), which "
              "are asked in the base model's chat template.")


def build_parser() -> argparse.ArgumentParser:
    from lorahub_plus.compose.config import ComposeConfig
    from lorahub_plus.compose.optimizers import OPTIMIZERS
    from lorahub_plus.routing.gate import GateConfig
    from lorahub_plus.hypernet.network import HypernetConfig
    from lorahub_plus.hypernet.training import HypernetTrainConfig
    from lorahub_plus.routing.routers import ROUTERS, RouterConfig
    from lorahub_plus.scoring import EvalConfig
    from lorahub_plus.evaluation import all_methods
    from lorahub_plus.library.train import TrainConfig

    parser = argparse.ArgumentParser(prog="lorahub-plus", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--library", type=Path, default=default_library(), help="library folder")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("search", parents=[common], help=COMMANDS["search"])
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", parents=[common], help=COMMANDS["eval"],
                       description="Evaluate a method on a task's held-out split. " + TASK_FILES)
    p.add_argument("--task", required=True, help="task file (.json/.jsonl) or BIG-bench task name")
    p.add_argument("--method", choices=sorted(all_methods()), default="zero-shot")
    p.add_argument("--adapter", help="PEFT adapter folder or hub id (method `adapter`)")
    p.add_argument("--base-model", help="hub id or path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N predictions against their targets "
                   "(--json carries all of them)")
    _add_config_flags(p, EvalConfig)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compose", parents=[common], help=COMMANDS["compose"],
                       description="Compose library experts from a few examples (the more, the more power the test against the base model has). "
                                   + TASK_FILES + f" Exit status {NO_ADAPTER}: no candidate beat the base model, so no "
                                   "adapter was written (`--out` holds report.json, which lists the best candidates).")
    p.add_argument("--examples", type=Path, required=True, help="few-shot file (.jsonl or task .json)")
    p.add_argument("--description", help="one line saying what the task is (helps retrieval)")
    p.add_argument("--out", type=Path, required=True, help="PEFT adapter folder to write (with report.json, loss.png)")
    p.add_argument("--overwrite", action="store_true", help="replace `--out` if it is an earlier output of ours")
    p.add_argument("--base-model", help="hub id or path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--candidates", default="retrieve", help="retrieve, or comma-separated expert names")
    _add_config_flags(p, ComposeConfig, choices={"optimizer": OPTIMIZERS})
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("route", parents=[common], help=COMMANDS["route"],
                       description="Route each input to its experts and answer it. An input is plain text, as a "
                                   "person types it (\"What is 47 plus 38?\"); it is asked in the base model's chat "
                                   "template, and the answer runs to the end of the model's turn. It goes to an expert "
                                   "only if that expert learned the chat framing and is close to it (retrieval); "
                                   "otherwise the base model answers.")
    p.add_argument("text", nargs="?", help="one input, e.g. \"What is 47 plus 38?\" (or --inputs)")
    p.add_argument("--inputs", type=Path, help="JSONL file, one object with an `input` (plain text) a line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--base-model", help="hub id or path (default: embedded SmolLM2-135M-Instruct)")
    _add_config_flags(p, RouterConfig, choices={"router": ROUTERS})
    p.set_defaults(func=cmd_route)

    gate = sub.add_parser("gate", help=COMMANDS["gate"]).add_subparsers(dest="action", required=True)
    p = gate.add_parser("train", parents=[common], help="train the gate on the library tasks' training splits")
    p.add_argument("--base-model", help="hub id or path (default: the library's)")
    _add_config_flags(p, GateConfig)
    p.set_defaults(func=cmd_gate)

    hyper = sub.add_parser("hypernet", help=COMMANDS["hypernet"]).add_subparsers(
        dest="action", required=True)
    p = hyper.add_parser("train", parents=[common], help="train it: reconstruct the experts, then SFT on many tasks")
    p.add_argument("--base-model", help="hub id or path (default: the library's)")
    p.add_argument("--tasks", type=Path, help="task folder (default: ../shared/data/bigbench)")
    p.add_argument("--exclude", type=Path, default=REPO_ROOT / "benchmarks" / "dev_tasks.txt",
                   help="held-out tasks: never trained on, nor their families and near-duplicates")
    p.add_argument("--work", type=Path, default=Path("hypernet-run"),
                   help="folder for checkpoints; a run given the same folder resumes")
    _add_config_flags(p, HypernetConfig)
    _add_config_flags(p, HypernetTrainConfig)
    p.set_defaults(func=cmd_hypernet)

    p = sub.add_parser("train-multitask", parents=[common],
                       help=COMMANDS["train-multitask"])
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace `--out` if it is an earlier output of ours")
    p.add_argument("--per-task", type=int, default=8, help="training examples drawn from each task")
    p.add_argument("--tasks", type=Path, help="task folder (default: ../shared/data/bigbench)")
    p.add_argument("--exclude", type=Path, default=REPO_ROOT / "benchmarks" / "dev_tasks.txt",
                   help="held-out tasks: never trained on, nor their families and near-duplicates")
    p.add_argument("--validation", type=int, default=0,
                   help="leave out the families a `hypernet train --validation N` run validates on")
    p.add_argument("--base-model", help="hub id or path (default: the library's)")
    _add_config_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train_multitask)

    p = sub.add_parser("synthesize", parents=[common], help=COMMANDS["synthesize"],
                       description="Write an adapter from a plain description (\"Add two numbers.\") and/or "
                                   "examples. " + TASK_FILES)
    p.add_argument("--description", help="what the task is, in a sentence or two")
    p.add_argument("--examples", type=Path, help="few-shot file (.jsonl or task .json): inputs and targets")
    p.add_argument("--out", type=Path, help="PEFT adapter folder to write (with card.json)")
    p.add_argument("--add-to-library", metavar="NAME", help="also add it to the library under NAME")
    p.add_argument("--overwrite", action="store_true", help="replace `--out` if it is an earlier output of ours")
    p.add_argument("--replace", action="store_true", help="with --add-to-library: replace an expert of that name")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("train-expert", parents=[common], help=COMMANDS["train-expert"],
                       description="Train a LoRA expert on one task. " + TASK_FILES)
    p.add_argument("task", help="task file or BIG-bench task name")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace `--out` if it is an earlier expert of ours")
    p.add_argument("--base-model", help="hub id or path (default: embedded SmolLM2-135M-Instruct)")
    _add_config_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train_expert)

    lib = sub.add_parser("library", help=COMMANDS["library"]).add_subparsers(dest="action", required=True)
    p = lib.add_parser("init", parents=[common], help="start an empty library for a base model")
    p.add_argument("--base-model", help="hub id or path (default: embedded SmolLM2-135M-Instruct)")
    p = lib.add_parser("add", parents=[common], help="add a PEFT adapter folder or hub id")
    p.add_argument("source")
    p.add_argument("--name")
    p.add_argument("--description")
    p.add_argument("--keywords", nargs="*")
    p.add_argument("--examples", type=Path, help="task/JSONL file whose inputs give the input centroid")
    p.add_argument("--replace", action="store_true", help="replace an expert of the same name")
    p.add_argument("--base-model-mismatch", choices=["ok"], help="add an adapter whose config names another base "
                   "model (of the same shapes); the card records the model it names")
    p = lib.add_parser("remove", parents=[common], help="remove an expert")
    p.add_argument("name")
    lib.add_parser("list", parents=[common], help="list experts")
    p = lib.add_parser("show", parents=[common], help="print an expert's card")
    p.add_argument("name")
    p = lib.add_parser("verify", parents=[common], help="check checksums, shapes, configs and index")
    p.add_argument("path", nargs="?", type=Path, help="library folder (same as --library)")
    lib.add_parser("reindex", parents=[common], help="re-embed cards and rebuild the indexes")
    lib.add_parser("repair", parents=[common],
                   help="finish or undo interrupted writes, rebuild a stale index, fix local base-model paths")
    lib.add_parser("summary", parents=[common], help="write the library's README.md table and accuracy plot")
    lib.add_parser("calibrate", parents=[common], help="compute the thresholds compose reads from the library "
                   "(`close`: from its experts' own held-out data and task files) into calibration.json")
    p = lib.add_parser("build", parents=[common], help="train and add every expert of a selection (resumable)")
    p.add_argument("--select", type=Path, required=True, help="selection JSON (tasks and training settings)")
    p.add_argument("--tasks", type=Path, help="task folder (default: ../shared/data/bigbench)")
    p.add_argument("--out", type=Path, help="library folder (same as --library)")
    p.add_argument("--exclude", type=Path, default=REPO_ROOT / "benchmarks" / "dev_tasks.txt",
                   help="held-out task list that the selection must not touch")
    p.add_argument("--shard", default="0/1", help="I/N: build every N-th task from the I-th (parallel builds)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="train the experts as Ray tasks: a local Ray instance, or the cluster at ADDRESS (`auto`, "
                        "`ray://HOST:10001`; the library must be on a file system every node sees)")
    p.add_argument("--cpus-per-task", type=int, default=1, help="--ray: CPUs (torch threads) per expert")
    for p in lib.choices.values():
        p.set_defaults(func=cmd_library)

    p = sub.add_parser("serve", parents=[common], help=COMMANDS["serve"],
                       description="An OpenAI-compatible server: POST /v1/completions and /v1/chat/completions with "
                                   "`model` the base model, an expert, `auto` or `route:retrieval|arrow|gate`, or an "
                                   "`adapters` mixture {name: weight}; GET /v1/models, GET /v1/adapters?q=.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $LORAHUB_PLUS_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--base-model", help="hub id or path (default: the library's)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="serve as a Ray Serve application: a local Ray instance, or join ADDRESS (`auto`, "
                        "`ray://HOST:10001`); needs `pip install 'lorahub-plus[ray]'`")
    p.add_argument("--replicas", type=int, default=2, help="--ray: copies of the server, each with the model")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="--ray: CPUs Ray reserves per replica")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", parents=[common], help=COMMANDS["demo"])
    p.add_argument("--n-test", type=int, default=30)
    p.set_defaults(func=cmd_demo)
    return parser


def _check_text(args) -> None:
    """Text arguments (a query, a description) reach the tokenizers, which refuse the lone surrogates that stand
    for bytes the terminal's encoding could not decode; paths keep them, as the file system does."""
    for name, value in vars(args).items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"`{name}` is not valid UTF-8 text: {value!r}") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):  # the command list alone: no torch to import
        top = argparse.ArgumentParser(prog="lorahub-plus", description=__doc__)
        sub = top.add_subparsers(dest="command", required=True)
        for name, help_ in COMMANDS.items():
            sub.add_parser(name, help=help_)
        top.parse_args(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "path", None) is not None:
        args.library = args.path
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        _check_text(args)
        args.func(args)
    except (LoraHubPlusError, ValueError, OSError) as e:
        if args.verbose:
            raise
        if getattr(args, "json", False):  # a script reading stdout gets JSON there too
            print(json.dumps({"error": str(e), "kind": type(e).__name__}))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
