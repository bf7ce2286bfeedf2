"""Evaluation: every method (zero-shot, ICL, an adapter, compose, routing, synthesis, ...) scored on the
same seeded split of a task. `harness` registers methods by name and runs them; `methods` registers the
product's. Evaluation imports the product, never the other way round."""
import importlib

_EXPORTS = {"evaluate": "harness", "EvalResult": "harness", "all_methods": "harness", "method_options": "harness", "eval_split": "harness", "register_method": "registry", "Prepared": "registry"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):  # lazy: importing the package loads no torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
