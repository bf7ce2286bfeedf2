"""lorahub-plus: search, compose, route and synthesize LoRA experts.

Importing the package imports every module that registers something (evaluation methods,
optimizers), so each registry is complete whichever module a caller imports first.
"""
__version__ = "0.1.0"

from . import compose, routers, synthesize, train  # noqa: E402  (they register evaluation methods, optimizers, routers)
from .hub import Hub  # noqa: E402  (the front door)

__all__ = ["__version__", "Hub", "compose", "routers", "synthesize", "train"]
