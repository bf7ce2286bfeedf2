"""Evaluation: every method (zero-shot, ICL, an adapter, compose, routing, synthesis, ...) scored on the
same seeded split of a task. `harness` registers methods by name and runs them; `methods` registers the
product's. Evaluation imports the product, never the other way round."""
from lorahub_plus.lazy import lazy_exports

_EXPORTS = {"evaluate": "harness", "EvalResult": "harness", "all_methods": "harness", "method_options": "harness", "eval_split": "harness", "register_method": "registry", "Prepared": "registry"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
