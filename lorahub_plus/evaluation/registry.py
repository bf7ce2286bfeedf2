"""Evaluation methods by name: what a method is, and how one registers."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, NamedTuple


class Prepared(NamedTuple):
    """What a method yields: the model to score and its few-shot examples; optionally a function from the
    test examples to their routes (one row each, for a RoutedModel) and notes for the result."""
    model: object
    shots: list
    routes: Callable | None = None
    notes: dict | None = None


# A method is a context manager: given (model, tokenizer, task, train split, config, **options) it
# yields a Prepared (or a plain (model, shots) tuple) and restores the model on exit. Its keyword
# parameters are the options it takes; `evaluate` refuses any other option that is not None.
Method = Callable[..., ContextManager[tuple]]
METHODS: dict[str, Method] = {}


NO_SHOTS: set[str] = set()
"""Methods that use none of the train split (the model as it is, a given adapter, routing)."""


def register_method(name: str, shots: bool = True):
    """Register an evaluation method under `name`; a second method with the same name is refused. `shots`: it
    learns from the train split (else a task with too few examples for the shots is all test)."""
    def wrap(fn) -> Method:
        if name in METHODS:
            raise ValueError(f"evaluation method `{name}` is already registered")
        if not shots:
            NO_SHOTS.add(name)
        METHODS[name] = contextmanager(fn)
        return METHODS[name]
    return wrap
