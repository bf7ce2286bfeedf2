"""Every file lorahub-plus reads is parsed here, so any parse failure (missing, unreadable, not UTF-8,
not JSON, the wrong JSON type, a broken safetensors header) becomes one of our errors naming the path.

Each reader takes the error class to raise: a task file fails with TaskFormatError, a library file
with LibraryError, and so on; callers check fields and raise the same way.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from lorahub_plus.errors import LibraryError, LoraHubPlusError

if TYPE_CHECKING:
    import torch

_JSON_TYPES = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "an integer",
               float: "a number", bool: "true or false"}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_PLURALS = {dict: "JSON objects", list: "JSON lists", str: "strings", int: "integers", float: "numbers",
            bool: "true/false values"}


def read_text(path: Path, error: type[LoraHubPlusError] = LibraryError) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")  # a leading BOM (Windows editors) is dropped
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from e


def parse_json(text: str, where: str, expected: type = dict, error: type[LoraHubPlusError] = LibraryError):
    """`text` parsed as JSON whose top level is `expected`; `where` names the file (and line)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON (line {e.lineno}: {e.msg})") from e
    except (RecursionError, ValueError) as e:  # ValueError: e.g. an integer of over 4,300 digits
        raise error(f"{where}: not valid JSON ({e})") from e
    if not isinstance(value, expected):
        raise error(f"{where}: expected {_JSON_TYPES[expected]} at the top level, got {type(value).__name__}")
    try:  # JSON's \ud800-style escapes can spell a lone surrogate; look closer only where one may be
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{where}: holds a lone surrogate escape (\\u{ord(e.object[e.start]):04x}), which is not "
                    "Unicode text") from e
    return value


def read_json(path: Path, expected: type = dict, error: type[LoraHubPlusError] = LibraryError):
    return parse_json(read_text(path, error), str(path), expected, error)


def _is(value, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def _describe(kinds: tuple[type, ...]) -> str:
    return " or ".join(_JSON_TYPES.get(k, k.__name__) for k in kinds)


def check_field(value, kind: type | tuple[type, ...], where: str, name: str, error: type[LoraHubPlusError],
                item: type | tuple[type, ...] | None = None):
    """`value` of field `name` is a `kind` (bool never passes for int), with `item`-typed members if given."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    items = item if isinstance(item, tuple) or item is None else (item,)
    if not _is(value, kinds) or (items is not None and not all(_is(v, items) for v in value)):
        expected = _describe(kinds) + (" of " + " or ".join(_PLURALS.get(k, k.__name__) for k in items) if items else "")
        raise error(f"{where}: field `{name}` must be {expected}, got {value!r:.80}")
    return value


def check_number(name: str, value, low: float = 0.0, high: float = math.inf, low_inclusive: bool = False) -> None:
    """Refuse a setting outside (low, high), or [low, high) with `low_inclusive`: so NaN and inf too, since NaN
    fails every comparison."""
    if not ((low <= value) if low_inclusive else (low < value)) or not value < high:
        bound = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}")


def check_whole(name: str, value, low: int = 1) -> None:
    """Refuse a setting that is not a whole number >= `low`; True and 2.0 too, since a count is an int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be a whole number >= {low}, got {value!r}")


def read_safetensors(path: Path, error: type[LoraHubPlusError] = LibraryError) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (never a pickle), each finite."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError, MemoryError) as e:
        raise error(f"{path}: not a readable safetensors file ({e})") from e
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value.float()).all():  # float() for float8 too
            raise error(f"{path}: tensor `{key}` holds NaN or inf")
    return tensors


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
