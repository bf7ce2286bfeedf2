"""The evaluation harness: methods registered by name, each scored on the same seeded split."""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from lorahub_plus.evaluation.registry import METHODS, NO_SHOTS, Method, Prepared
from lorahub_plus.scoring import EvalConfig, score
from lorahub_plus.tasks import Example, Task, split_examples


@dataclass
class EvalResult:
    task: str
    method: str
    accuracy: float
    n: int
    correct: int
    wall_s: float  # adaptation and scoring
    adapt_s: float  # the method's own preparation (composition, training, ...), before scoring
    tokens: int  # every token the model processed, generated ones included
    input_tokens_per_example: float  # prompt tokens per test example (ICL pays for its shots here)
    seed: int
    shot_seed: int
    shots: int
    notes: dict = field(default_factory=dict)  # what the method decided (compose: which base test ran, ...)
    n_asked: int = 0  # the test examples asked for (`n` is fewer when the task has too few)
    predictions: list = field(default_factory=list)  # {input, prediction, targets, correct} per test example

    def to_dict(self) -> dict:
        return asdict(self)


def all_methods() -> dict[str, Method]:
    """Every registered method (`methods.py` registers them when first imported, here)."""
    import importlib

    importlib.import_module("lorahub_plus.evaluation.methods")  # importing it registers them
    return METHODS


def method_options(method: str) -> list[str]:
    """The keyword options `method` takes, read from its signature (after model, tokenizer, task, train, cfg)."""
    if method not in all_methods():
        raise ValueError(f"`method` must be one of {sorted(METHODS)}, got {method!r}")
    return list(inspect.signature(METHODS[method].__wrapped__).parameters)[5:]


def eval_split(task: Task, cfg: EvalConfig, shots: bool = True) -> tuple[list[Example], list[Example]]:
    """(train in shot order, test): the seeded split every method is scored on, shots drawn from its train.
    A method that uses no shots (`shots=False`) takes every example as test where too few are left for them."""
    n_test = min(cfg.n_test, len(task.examples) - cfg.shots)  # the same test set for every method
    if n_test < 1 and not shots:
        n_test = min(cfg.n_test, len(task.examples))
    if n_test < 1:
        raise ValueError(f"task `{task.name}` has {len(task.examples)} examples: too few for {cfg.shots} shots")
    train, test = split_examples(task.examples, n_test, cfg.seed)
    if cfg.shot_seed >= 0:
        train = [train[i] for i in np.random.default_rng(cfg.shot_seed).permutation(len(train))]
    return train, test


def evaluate(model, tokenizer, task: Task, method: str = "zero-shot", cfg: EvalConfig | None = None,
             progress: bool = False, **options) -> EvalResult:
    """Split `task` by seed, prepare `method`, and score it on the test split. Plain examples (a JSONL file) are
    asked in the model's chat template (`prompts.for_model`)."""
    from lorahub_plus.prompts import for_model

    cfg = cfg or EvalConfig()
    task = for_model(task, tokenizer)
    params = method_options(method)
    options = {k: v for k, v in options.items() if v is not None}
    if set(options) - set(params):
        raise ValueError(f"method `{method}` takes the options {params}, not {sorted(set(options) - set(params))}")
    train, test = eval_split(task, cfg, shots=method not in NO_SHOTS)
    start = time.perf_counter()
    with METHODS[method](model, tokenizer, task, train, cfg, **options) as prepared:
        prepared = Prepared(*prepared)
        adapt_s = time.perf_counter() - start
        routes = prepared.routes(test) if prepared.routes else None  # each test example routed on its own input
        scored = score(prepared.model, tokenizer, task, test, prepared.shots, cfg, progress, routes)
    correct = scored.correct
    return EvalResult(task.name, method, sum(correct) / len(correct), len(correct), sum(correct),
                      time.perf_counter() - start, adapt_s, scored.tokens, scored.input_tokens, cfg.seed, cfg.shot_seed,
                      len(prepared.shots), prepared.notes or {}, cfg.n_test,
                      [{"input": ex.input, "prediction": p, "targets": list(ex.answers), "correct": c}
                       for ex, p, c in zip(test, scored.predictions, correct)])
