"""lorahub-plus: search, compose, route, synthesize and serve LoRA experts. `Hub` is the front door.

Importing the package loads nothing heavy (no torch): `Hub` and the modules load on first use, and the
evaluation harness imports the modules that register methods when it needs them (`evaluation.all_methods`).
"""
from lorahub_plus.version import __version__

__all__ = ["__version__", "Hub"]


def __getattr__(name: str):
    if name == "Hub":
        from lorahub_plus.hub import Hub

        return Hub
    raise AttributeError(f"module 'lorahub_plus' has no attribute {name!r}")
