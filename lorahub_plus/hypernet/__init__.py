"""Text-to-LoRA: a hypernetwork that generates an adapter from a task description or a few examples.

`network` is the hypernetwork (`HyperLoRA`) and its saved form, `training` trains it on library tasks
(resumably), `synthesize` writes a PEFT adapter from a description and holds the calibrated threshold
under which compose and routing fall back to it."""
from lorahub_plus.lazy import lazy_exports

_EXPORTS = {'synthesize': 'synthesize', 'generate_lora': 'synthesize', 'HyperLoRA': 'network', 'HypernetConfig': 'network'}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
