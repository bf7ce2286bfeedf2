"""PEFT adapter folders: resolve (local path or hub id), validate, read, attach. Safetensors only.

Ranks and scales follow peft's own rules (`rank_pattern`, `alpha_pattern`, rsLoRA), so what we
stack or check is what peft would load.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from lorahub_plus.errors import IncompatibleAdapterError, LibraryError
from lorahub_plus.library.readers import check_field, read_json, read_safetensors, sha256_file

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


def read_config(path: Path) -> dict:
    """adapter_config.json, with the fields we rely on checked; peft's own checks run too."""
    config = read_json(path, dict, IncompatibleAdapterError)
    if config.get("peft_type") != "LORA":
        raise IncompatibleAdapterError(f"{path}: field `peft_type` must be 'LORA', got {config.get('peft_type')!r}")
    where, err = str(path), IncompatibleAdapterError
    check_field(config.get("r"), int, where, "r", err)
    alpha = check_field(config.get("lora_alpha", 8), (int, float), where, "lora_alpha", err)
    if not 0 < alpha < math.inf:  # NaN too
        raise IncompatibleAdapterError(f"{path}: field `lora_alpha` must be a finite number > 0, got {alpha!r}")
    check_field(config.get("use_rslora", False), bool, where, "use_rslora", err)
    check_field(config.get("base_model_name_or_path") or "", str, where, "base_model_name_or_path", err)
    for name, kinds in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pattern = check_field(config.get(name) or {}, dict, where, name, err)
        check_field(list(pattern.values()), list, where, name, err, item=kinds)
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as e:
                raise IncompatibleAdapterError(f"{path}: field `{name}` key {key!r} is not a regular expression ({e})")
            if not 0 < value < math.inf:
                raise IncompatibleAdapterError(f"{path}: field `{name}` value for {key!r} must be a finite number "
                                               f"> 0, got {value}")
    if config["r"] < 1:
        raise IncompatibleAdapterError(f"{path}: field `r` must be >= 1, got {config['r']}")
    if config.get("use_dora"):
        raise IncompatibleAdapterError(
            f"{path}: field `use_dora` is true: a DoRA adapter rescales each output by a learned magnitude over the "
            "norm of W + BA, which neither mixes per row nor composes; lorahub-plus refuses it (load it on its own "
            "with peft)")
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    try:
        LoraConfig(**{k: v for k, v in config.items() if k in known and k != "peft_type"})
    except Exception as e:  # peft's own validation, whatever it raises
        raise IncompatibleAdapterError(f"{path}: peft refuses this LoRA config ({type(e).__name__}: {e})") from e
    return config


def rank_and_scale(config: dict, module: str) -> tuple[int, float]:
    """(r, alpha / r, or alpha / sqrt(r) with rsLoRA) of `module`, by peft's pattern rules."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), module), config["r"])
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config.get("lora_alpha", 8))
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def read_adapter(path: str | os.PathLike, check_card: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, weights) of a PEFT LoRA folder; refuses pickles, bad configs, NaN, ranks that
    differ from the config's, and (with check_card) weights that differ from a card.json's sha256."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise LibraryError(f"{path}: missing `{CONFIG_FILE}` (expected a PEFT adapter folder)")
    if not weights_file.is_file():
        raise LibraryError(f"{path}: missing `{WEIGHTS_FILE}`; only safetensors weights are loaded, never pickles")
    config = read_config(config_file)
    weights = read_safetensors(weights_file, IncompatibleAdapterError)
    shapes = lora_shapes(weights, str(weights_file))
    peak = {}  # module -> largest |weight| of its A and of its B
    for key, value in weights.items():
        peak.setdefault(_KEY.match(key)["module"], []).append(float(value.abs().max()) if value.numel() else 0.0)
    for module, (_, _, r) in shapes.items():
        expected, scale = rank_and_scale(config, module)
        if r != expected:
            raise IncompatibleAdapterError(
                f"{weights_file}: module `{module}` has rank {r}, but {config_file} gives it r={expected}")
        if not scale * r * math.prod(peak[module]) < 1e30:  # a bound on |scale * B A|: float32 must hold it
            raise IncompatibleAdapterError(f"{weights_file}: module `{module}`'s weights times its scale {scale:g} "
                                           f"(`lora_alpha` / r in {config_file}) overflow")
    card_file = path / "card.json"
    if check_card and card_file.is_file():
        recorded = read_json(card_file).get("sha256")
        if recorded and sha256_file(weights_file) != recorded:
            raise LibraryError(f"{weights_file}: sha256 differs from {card_file} field `sha256` (the weights "
                               "changed after the card was written; run `lorahub-plus library verify`)")
    return config, weights


def lora_shapes(weights: dict[str, torch.Tensor], source: str) -> dict[str, list[int]]:
    """{module name: [in_features, out_features, rank]} from lora_A (r, in) and lora_B (out, r) pairs."""
    pairs: dict[str, dict[str, torch.Size]] = {}
    for key, value in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise IncompatibleAdapterError(f"{source}: tensor `{key}` is not a LoRA A/B weight")
        if value.dim() != 2 or not value.is_floating_point():
            raise IncompatibleAdapterError(f"{source}: tensor `{key}` must be a 2-D float matrix, got "
                                           f"{value.dtype} {tuple(value.shape)}")
        pairs.setdefault(match["module"], {})[match["ab"]] = value.shape
    shapes = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"} or ab["A"][0] != ab["B"][1] or ab["A"][0] < 1:
            raise IncompatibleAdapterError(f"{source}: module `{module}` needs lora_A (r, in) and lora_B (out, r)")
        shapes[module] = [ab["A"][1], ab["B"][0], ab["A"][0]]
    return shapes


def module_shapes(model) -> dict[str, list[int]]:
    """{module name: [in_features, out_features]} of every module peft's LoRA adapts as a linear map: nn.Linear,
    and GPT-2's Conv1D (its weight stored (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return {name: [m.in_features, m.out_features] if isinstance(m, torch.nn.Linear) else list(m.weight.shape)
            for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def check_shapes(shapes: dict[str, list[int]], base_shapes: dict[str, list[int]], source: str, base: str) -> None:
    """Refuse an adapter (`lora_shapes`) whose modules are missing from, or shaped unlike, the base model's
    ({module: [in, out]})."""
    for module, (n_in, n_out, _) in shapes.items():
        if module not in base_shapes:
            raise IncompatibleAdapterError(f"{source}: module `{module}` does not exist in the base model `{base}`")
        if list(base_shapes[module]) != [n_in, n_out]:
            raise IncompatibleAdapterError(
                f"{source}: module `{module}` is {n_in}->{n_out} in the adapter but "
                f"{base_shapes[module][0]}->{base_shapes[module][1]} in `{base}`")
    if not shapes:
        raise IncompatibleAdapterError(f"{source}: the adapter holds no LoRA weights")


def check_target_modules(config: dict, shapes: dict[str, list[int]], source: str) -> None:
    """Refuse weights on modules that the config's `target_modules` does not name: peft would create LoRA
    layers on the named modules only and load these weights nowhere (a silent no-op)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return  # peft picks the modules (the model type's defaults, or every linear one): the weights say which
    if isinstance(targets, str):
        stray = sorted(m for m in shapes if not re.fullmatch(targets, m))
    else:
        names = set(targets) if isinstance(targets, list) else set()
        stray = sorted(m for m in shapes if "all-linear" not in names and not any(
            m == t or m.endswith("." + t) for t in names))
    if stray:
        raise IncompatibleAdapterError(
            f"{source}: field `target_modules` {targets!r} does not name the modules its weights adapt ({stray[0]}"
            f"{f' and {len(stray) - 1} more' if len(stray) > 1 else ''}); peft would load none of them")


def attach_adapter(model, name_or_path: str | os.PathLike, adapter_name: str = "default"):
    """Wrap `model` in a PeftModel with the adapter's weights (validated first, shapes against `model`'s)."""
    from peft import PeftModel

    from lorahub_plus.models import base_model_id, quiet_peft
    from lorahub_plus.routed import check_bare

    check_bare(model)
    path = resolve_adapter(name_or_path)
    _, weights = read_adapter(path)
    check_shapes(lora_shapes(weights, str(path / WEIGHTS_FILE)), module_shapes(model), str(path), base_model_id(model))
    with quiet_peft():
        return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name)
