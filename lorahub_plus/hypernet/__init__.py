"""Text-to-LoRA: a hypernetwork that generates an adapter from a task description or a few examples.

`network` is the hypernetwork (`HyperLoRA`) and its saved form, `training` trains it on library tasks
(resumably), `synthesize` writes a PEFT adapter from a description and holds the calibrated threshold
under which compose and routing fall back to it."""
import importlib

_EXPORTS = {'synthesize': 'synthesize', 'generate_lora': 'synthesize', 'HyperLoRA': 'network', 'HypernetConfig': 'network'}
__all__ = list(_EXPORTS)


def __getattr__(name: str):  # lazy: importing the package loads no torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
