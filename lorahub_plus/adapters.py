"""PEFT adapter folders: resolve (local path or hub id), validate, read, attach. Safetensors only."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import IncompatibleAdapterError, LibraryError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def resolve_adapter(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloading only the config and safetensors."""
    path = Path(name_or_path)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    except Exception as e:  # offline, unknown id, ...: say what was tried
        raise LibraryError(f"`{name_or_path}` is neither a local adapter folder nor a reachable hub id: {e}") from e


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, weights) of a PEFT LoRA folder; refuses pickled weights and bad configs."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise LibraryError(f"{path}: missing `{CONFIG_FILE}` (expected a PEFT adapter folder)")
    if not weights_file.is_file():
        raise LibraryError(f"{path}: missing `{WEIGHTS_FILE}`; only safetensors weights are loaded, never pickles")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LibraryError(f"{config_file}: not valid JSON ({e.msg}, line {e.lineno})") from e
    if config.get("peft_type") != "LORA":
        raise IncompatibleAdapterError(f"{config_file}: field `peft_type` must be 'LORA', got {config.get('peft_type')!r}")
    weights = load_file(str(weights_file))
    for key, value in weights.items():
        if not torch.isfinite(value).all():
            raise IncompatibleAdapterError(f"{weights_file}: tensor `{key}` holds NaN or inf")
    return config, weights


def lora_shapes(weights: dict[str, torch.Tensor], source: str) -> dict[str, list[int]]:
    """{module name: [in_features, out_features, rank]} from lora_A (r, in) and lora_B (out, r) pairs."""
    pairs: dict[str, dict[str, torch.Size]] = {}
    for key, value in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise IncompatibleAdapterError(f"{source}: tensor `{key}` is not a LoRA A/B weight")
        pairs.setdefault(match["module"], {})[match["ab"]] = value.shape
    shapes = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"} or ab["A"][0] != ab["B"][1]:
            raise IncompatibleAdapterError(f"{source}: module `{module}` needs lora_A (r, in) and lora_B (out, r)")
        shapes[module] = [ab["A"][1], ab["B"][0], ab["A"][0]]
    return shapes


def attach_adapter(model, name_or_path: str | os.PathLike, adapter_name: str = "default"):
    """Wrap `model` in a PeftModel with the adapter's weights (validated first)."""
    from peft import PeftModel

    path = resolve_adapter(name_or_path)
    read_adapter(path)
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name)
