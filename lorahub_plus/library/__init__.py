"""The adapter library: a folder of experts (PEFT adapters with cards) and what reads and writes it.

`store` opens a library (`Library`: add, remove, search, verify), `index` keeps its FAISS search index,
`adapters` reads and checks PEFT adapter folders, `stack` loads a set of experts as stacked tensors and
writes PEFT adapters, `atomic` makes every write atomic and locked, `readers` reads untrusted files (JSON,
safetensors) with errors that name the file and field. `train` trains an expert on a task and `build`
trains many into a library, resumably. Imports only the core modules (errors, paths, models, tasks,
prompts, encode, scoring, routed)."""
import importlib

_EXPORTS = {'Library': 'store', 'Card': 'store', 'TrainConfig': 'train', 'train_expert': 'train', 'build_library': 'build'}
__all__ = list(_EXPORTS)


def __getattr__(name: str):  # lazy: importing the package loads no torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
