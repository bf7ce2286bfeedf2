"""lorahub-plus: search, compose, route, synthesize and serve LoRA experts. `Hub` is the front door.

Importing the package loads nothing heavy (no torch): `Hub` and the modules load on first use, and the
evaluation harness imports the modules that register methods when it needs them (`evaluation.all_methods`).
"""
from lorahub_plus.version import __version__
from lorahub_plus.lazy import lazy_exports

__all__ = ["__version__", "Hub"]
__getattr__ = lazy_exports(__name__, {"Hub": "hub"})
