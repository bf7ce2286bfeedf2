"""Build a library from a committed selection of tasks: resumable, one atomic expert at a time."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lorahub_plus.library.atomic import STAGING, atomic_write_text
from lorahub_plus.errors import LibraryError
from lorahub_plus.library.store import NAME, Library
from lorahub_plus.paths import resolve_task
from lorahub_plus.plots import plot_accuracy
from lorahub_plus.library.readers import check_field, read_json, read_text
from lorahub_plus.tasks import load_task
from lorahub_plus.library.train import TrainConfig, train_expert

logger = logging.getLogger(__name__)


@dataclass
class Selection:
    """FILE for `library build`: {"defaults": {TrainConfig fields}, "tasks": [name or {"task", ...}]}.

    An entry may set `name`, `description` (replaces the task's own on the card) and TrainConfig fields.
    """

    defaults: dict
    tasks: list[dict]

    @classmethod
    def read(cls, path: Path, exclude: set[str] = frozenset()) -> "Selection":
        raw = read_json(Path(path))
        tasks = []
        for i, item in enumerate(check_field(raw.get("tasks", []), list, str(path), "tasks", LibraryError)):
            item = {"task": item} if isinstance(item, str) else item
            if not isinstance(item, dict) or not isinstance(item.get("task"), str):
                raise LibraryError(f"{path}: tasks[{i}]: field `task` must be a task name")
            item = {"name": item["task"].replace(":", "__"), **item}
            if item["task"].replace(":", "__") in exclude:
                raise LibraryError(f"{path}: tasks[{i}]: `{item['task']}` is a held-out dev task")
            if not NAME.match(check_field(item["name"], str, f"{path}: tasks[{i}]", "name", LibraryError)):
                raise LibraryError(f"{path}: tasks[{i}]: field `name` {item['name']!r} is not a valid expert name")
            tasks.append(item)
        defaults = check_field(raw.get("defaults", {}), dict, str(path), "defaults", LibraryError)
        selection = cls(defaults, tasks)
        for i, item in enumerate(tasks):  # every entry's training settings, checked now, not hours into a build
            try:
                selection.train_config(item)
            except (TypeError, ValueError) as e:
                raise LibraryError(f"{path}: tasks[{i}] with `defaults`: not valid training settings ({e})") from e
        return selection

    def train_config(self, item: dict) -> TrainConfig:
        overrides = {k: v for k, v in item.items() if k not in ("task", "name", "description")}
        return TrainConfig(**{**self.defaults, **overrides})


def read_task_list(path: Path) -> set[str]:
    """Task names, one a line; # comments."""
    lines = read_text(Path(path)).splitlines()
    return {line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()}


def build_library(selection: Selection, library: Library, tasks_dir: Path | None = None,
                  progress: bool = True, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Train every selected expert missing from `library` and add it.

    shard=(i, n) takes every n-th task from the i-th, so n processes can build one library together
    (the library lock serializes their writes; an expert another process finished is skipped).
    """
    from lorahub_plus.models import load_base_model

    done = set(library.names())
    mine = selection.tasks[shard[0]::shard[1]]
    todo = [t for t in mine if t["name"] not in done]
    report = [{"name": t["name"], "status": "skipped (built)"} for t in mine if t["name"] in done]
    if not todo:
        return report
    model, tokenizer = load_base_model(library.meta.get("load_from"))
    staging = library.path / STAGING / f"shard{shard[0]}of{shard[1]}"
    bar = tqdm(todo, desc="building experts", disable=not progress)
    for item in bar:
        if item["name"] in library.names():
            report.append({"name": item["name"], "status": "skipped (built)"})
            continue
        bar.set_postfix(expert=item["name"])
        start = time.perf_counter()
        card = train_expert(load_task(_task_path(item, tasks_dir)), staging / item["name"], selection.train_config(item),
                            model, tokenizer, progress=progress, overwrite=True)  # our own staging, left by a crash
        report.append(_enter(library, staging / item["name"], item, card, time.perf_counter() - start, bar))
    _remove_staging(staging)
    return report


def _remove_staging(staging: Path) -> None:
    """A build's own staging folder, and the library's staging root once no other build uses it."""
    shutil.rmtree(staging, ignore_errors=True)
    if staging.parent.is_dir() and not any(staging.parent.iterdir()):
        staging.parent.rmdir()


def _task_path(item: dict, tasks_dir: Path | None) -> Path:
    return resolve_task(Path(tasks_dir) / (item["task"].replace(":", "__") + ".json") if tasks_dir else item["task"])


def _enter(library: Library, folder: Path, item: dict, card, seconds: float, bar) -> dict:
    """Add a trained expert's folder to the library (the same atomic, locked add as any other) and report it."""
    library.add(folder, description=item.get("description"), replace=True)
    shutil.rmtree(folder, ignore_errors=True)
    m = card.metrics
    row = {"name": item["name"], "status": "built", "seconds": round(seconds, 1), "train_seconds": m["train_seconds"],
           "final_loss": round(m["final_loss"], 4), "base_accuracy": m["base_accuracy"],
           "expert_accuracy": m["expert_accuracy"]}
    bar.write(f"{item['name']}: loss {row['final_loss']:.3f}, base {m['base_accuracy']:.3f} -> "
              f"expert {m['expert_accuracy']:.3f}, {row['seconds']:.0f} s")
    return row


_WORKER_MODEL = {}  # a Ray worker process keeps its base model between the experts it trains


def _train_on_worker(item: dict, task_path: str, cfg: dict, load_from: str | None, out: str, threads: int):
    """One expert, trained in a Ray worker into `out` (the library's staging folder); returns (card, seconds)."""
    import torch

    from lorahub_plus.models import load_base_model

    torch.set_num_threads(threads)
    if load_from not in _WORKER_MODEL:
        _WORKER_MODEL[load_from] = load_base_model(load_from)
    model, tokenizer = _WORKER_MODEL[load_from]
    start = time.perf_counter()
    card = train_expert(load_task(Path(task_path)), Path(out), TrainConfig(**cfg), model, tokenizer, progress=False,
                        overwrite=True)
    return card, time.perf_counter() - start


def build_library_ray(selection: Selection, library: Library, tasks_dir: Path | None = None, address: str | None = None,
                      cpus_per_task: int = 1, progress: bool = True, retries: int = 2) -> list[dict]:
    """`build_library` with every missing expert trained as a Ray task (`cpus_per_task` threads each) on a local
    Ray instance or the cluster at `address`; the driver adds each result as it arrives, so an expert is in the
    library whole or not at all. A task whose worker dies is retried `retries` times, then reported as failed;
    rerunning after a crash of the driver trains only what is missing. On a cluster the library folder must be
    on a file system every node sees at the same path."""
    import ray

    done = set(library.names())
    todo = [t for t in selection.tasks if t["name"] not in done]
    report = [{"name": t["name"], "status": "skipped (built)"} for t in selection.tasks if t["name"] in done]
    if not todo:
        return report
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    train = ray.remote(num_cpus=cpus_per_task, max_retries=retries)(_train_on_worker)
    staging = (library.path / STAGING / "ray").resolve()
    pending = {train.remote(item, str(_task_path(item, tasks_dir).resolve()), selection.train_config(item).to_dict(),
                            library.meta.get("load_from"), str(staging / item["name"]), cpus_per_task): item
               for item in todo}
    bar = tqdm(total=len(todo), desc="building experts (ray)", disable=not progress)
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        item = pending.pop(ready)
        try:
            card, seconds = ray.get(ready)
            report.append(_enter(library, staging / item["name"], item, card, seconds, bar))
        except (ray.exceptions.RayError, LibraryError, ValueError) as e:  # reported, never half-added
            cause = getattr(e, "cause", None) or e  # a task's own exception, without Ray's header
            report.append({"name": item["name"], "status": f"failed: {type(cause).__name__}: {cause}"})
            shutil.rmtree(staging / item["name"], ignore_errors=True)
        bar.update()
    bar.close()
    _remove_staging(staging)
    return report


def write_summary(library: Library) -> Path:
    """library/README.md (a table of every expert) and accuracy.png (expert against base accuracy)."""
    cards = [c for c in library.cards() if _has_table_metrics(c)]
    gains = sorted(c.metrics["expert_accuracy"] - c.metrics["base_accuracy"] for c in cards)
    lines = [
        "# The default expert library", "",
        f"{len(cards)} LoRA experts on `{library.base_model}` (the embedded Q4_1 GGUF, dequantized), "
        "each trained on one BIG-bench task and measured on held-out examples of that task "
        "(the same examples for base and expert). Generated by `lorahub-plus library summary`; "
        "rebuild with `lorahub-plus library build` (see `select.json`).", "",
    ]
    if cards:
        beats = sum(g > 0 for g in gains)
        hours = sum(c.metrics["train_seconds"] for c in cards) / 3600
        lines += [f"Experts that beat the base model on their own task: {beats} of {len(cards)}; "
                  f"median gain {gains[len(gains) // 2]:+.3f} (min {gains[0]:+.3f}, max {gains[-1]:+.3f}). "
                  "Experts that do not beat it are marked `no`.", "",
                  f"Rebuilding on CPU: the cards record {hours:.1f} h of training loops (median "
                  f"{sorted(c.metrics['train_seconds'] for c in cards)[len(cards) // 2]:.0f} s an expert, on the "
                  "2-core build machine, one thread per shard); evaluation and saving add 10-18%, so two shards "
                  f"(`--shard 0/2` and `--shard 1/2` side by side) rebuild it in about {hours * 1.15 / 2:.1f} h.", "",
                  "![expert vs base accuracy](accuracy.png)", ""]
    lines += ["| expert | task | trained on | test n | base acc | expert acc | beats base |",
              "|---|---|---:|---:|---:|---:|:---:|"]
    for c in cards:
        m = c.metrics
        lines.append(f"| {c.name} | {c.source_task} | {m['n_train']} | {m['n_test']} | {m['base_accuracy']:.3f} "
                     f"| {m['expert_accuracy']:.3f} | {'yes' if m['expert_accuracy'] > m['base_accuracy'] else 'no'} |")
    others = [c for c in library.cards() if not _has_table_metrics(c)]
    if others:  # no task of their own (or metrics missing), so no row in the table
        lines += ["", "Also in the library, without an accuracy on a task of its own: " + "; ".join(
            f"`{c.name}` ({c.description})" for c in others) + "."]
    if (library.path / "hypernet" / "hypernet.json").is_file():
        lines += ["", "`hypernet/` holds the hypernetwork that `lorahub-plus synthesize` uses (`hypernet.json` lists its "
                  "training tasks, settings and metrics; `loss.png` its training curves)."]
    if (library.path / "gate" / "gate.json").is_file():
        lines += ["", "`gate/` holds the learned router that `--router gate` uses (`gate.json` lists the experts it "
                  "routes to, its settings and losses; `loss.png` its training curve; `make gate` rebuilds it)."]
    readme = library.path / "README.md"
    with library.transaction():  # one writer at a time, and a crash leaves the old files whole
        atomic_write_text(readme, "\n".join(lines) + "\n")
        plot_accuracy([(c.metrics["base_accuracy"], c.metrics["expert_accuracy"]) for c in cards],
                      library.path / "accuracy.png")
    return readme


TABLE_METRICS = ("expert_accuracy", "base_accuracy", "n_train", "n_test", "train_seconds")
"""What an expert trained on its own task records (`train_expert`), and the summary's table shows."""


def _has_table_metrics(card) -> bool:
    return all(isinstance(card.metrics.get(k), (int, float)) and not isinstance(card.metrics.get(k), bool)
               for k in TABLE_METRICS)
