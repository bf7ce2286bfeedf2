"""lorahub-plus: search, compose, route, synthesize and serve LoRA experts. `Hub` is the front door.

Importing the package loads nothing heavy (no torch): `Hub` and the modules load on first use, and the
evaluation harness imports the modules that register methods when it needs them (`evaluate.methods`).
"""
__version__ = "0.1.0"
__all__ = ["__version__", "Hub"]


def __getattr__(name: str):
    if name == "Hub":
        from .hub import Hub

        return Hub
    raise AttributeError(f"module 'lorahub_plus' has no attribute {name!r}")
