"""Serving: an OpenAI-compatible HTTP server (`app`) over a continuous-batching engine (`engine`) whose
rows each carry their own expert, mixture or router."""
import importlib

_EXPORTS = {'create_app': 'app', 'Engine': 'engine'}
__all__ = list(_EXPORTS)


def __getattr__(name: str):  # lazy: importing the package loads no torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
