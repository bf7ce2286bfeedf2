"""The adapter library: a folder of experts (PEFT adapters with cards) and what reads and writes it.

`store` opens a library (`Library`: add, remove, search, verify), `index` keeps its FAISS search index,
`adapters` reads and checks PEFT adapter folders, `stack` loads a set of experts as stacked tensors and
writes PEFT adapters, `atomic` makes every write atomic and locked, `readers` reads untrusted files (JSON,
safetensors) with errors that name the file and field. `train` trains an expert on a task and `build`
trains many into a library, resumably. Imports only the core modules (errors, paths, models, tasks,
prompts, encode, scoring, routed)."""
from lorahub_plus.lazy import lazy_exports

_EXPORTS = {'Library': 'store', 'Card': 'store', 'TrainConfig': 'train', 'train_expert': 'train', 'build_library': 'build'}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
