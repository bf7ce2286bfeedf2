"""Routing: each input (or each token) gets its own weights over the library's experts, inside one forward.

`routers` holds the routers (retrieval, Arrow, the learned gate) and `Router`, which routes inputs and
generates (an input no expert is close to falls back to an adapter the hypernetwork synthesizes); `gate`
trains and loads the learned gate. The per-row mixture itself is the core module `lorahub_plus.routed`."""
from lorahub_plus.lazy import lazy_exports

_EXPORTS = {'Router': 'routers', 'RouterConfig': 'routers', 'ROUTERS': 'routers', 'GateConfig': 'gate', 'train_gate': 'gate'}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
