"""Compose: weights over library experts, fitted on a user's few examples, tested against the base model.

`config` is what a user sets (`ComposeConfig`) and what the benchmarks compare (`Variant`), `composer`
runs it (`compose`: pick candidates, fit, test, export a PEFT adapter), `objective` is the few-shot loss a
weight vector gets (one batched forward for many), `optimizers` are the registered ways to fit the weights."""
from lorahub_plus.lazy import lazy_exports

_EXPORTS = {'compose': 'composer', 'Composition': 'composer', 'ComposeConfig': 'config', 'Variant': 'config',
            'OPTIMIZERS': 'optimizers'}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
