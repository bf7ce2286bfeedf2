"""Serving: an OpenAI-compatible HTTP server (`app`) over a continuous-batching engine (`engine`) whose
rows each carry their own expert, mixture or router."""
from lorahub_plus.lazy import lazy_exports

_EXPORTS = {'create_app': 'app', 'Engine': 'engine'}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
