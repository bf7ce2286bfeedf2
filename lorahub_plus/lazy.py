"""Lazy public names for a package: importing the package loads nothing heavy (no torch)."""
import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` that imports `package.<module>` on first use of one of its `exports`
    ({name: module})."""
    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
