"""Compose: weights over library experts, fitted on a user's few examples, tested against the base model.

`config` is what a user sets (`ComposeConfig`), `composer` runs it (`compose`: pick candidates, fit,
test, export a PEFT adapter), `objective` is the few-shot loss a weight vector gets (one batched forward
for many), `optimizers` are the registered ways to fit the weights."""
import importlib

_EXPORTS = {'compose': 'composer', 'Composition': 'composer', 'ComposeConfig': 'config', 'OPTIMIZERS': 'optimizers'}
__all__ = list(_EXPORTS)


def __getattr__(name: str):  # lazy: importing the package loads no torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
