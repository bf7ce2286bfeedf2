"""Synthesize an adapter from a description and/or a few examples with the library's hypernetwork, and the
fallback that uses one when no expert is close: a standard PEFT folder with a card marked synthesized.
Also the evaluation methods `hypernet` (the task's description only) and `hypernet-fewshot` (its shots)."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch


from lorahub_plus.library.atomic import atomic_dir, check_output_dir
from lorahub_plus.errors import LibraryError
from lorahub_plus.hypernet.network import (HYPERNET_DIR, HYPERNET_WEIGHTS, HyperLoRA, load_hypernet, read_hypernet_meta, task_vector)
from lorahub_plus.library.store import CARD_FILE, Card, Library
from lorahub_plus.paths import default_library
from lorahub_plus.library.readers import sha256_file
from lorahub_plus.library.stack import Stack, save_peft_adapter, stacked

logger = logging.getLogger(__name__)

SYNTHESIZED = "synthesized"
"""The candidate name a synthesized adapter takes in a composition."""


def generate_lora(library: Library, description: str | None = None, examples: list[tuple[str, str]] | None = None,
                  hypernet: tuple[HyperLoRA, dict] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A (r, in), B (out, r))} at LoRA scale 1, from the library's hypernetwork (or `hypernet`)."""
    net, _ = hypernet or load_hypernet(library)
    with torch.no_grad():
        lora = net.eval()(task_vector(library.embedder, description, examples)[None])
    return {m: (A[0], B[0]) for m, (A, B) in lora.items()}


def synthesize(description: str | None = None, examples: list[tuple[str, str]] | None = None,
               out: str | Path | None = None, library: Library | str | Path | None = None,
               add_to_library: str | None = None, overwrite: bool = False,
               hypernet: tuple[HyperLoRA, dict] | None = None, replace: bool = False) -> Card:
    """Write the adapter the hypernetwork gives for `description` and/or `examples` ((input, target) pairs) to
    `out` (a PEFT folder with card.json), and, with `add_to_library`, add it to the library under that name
    (through `Library.add`, so search, compose and routing see it; `replace` replaces an expert of that name).
    Both destinations are checked before anything is written. Returns its card."""
    library = library if isinstance(library, Library) else Library(library or default_library())
    if out is None and add_to_library is None:
        raise ValueError("give `out` (a folder to write), `add_to_library` (a name), or both")
    if description is not None and not isinstance(description, str):
        raise ValueError(f"`description` must be a string, got {type(description).__name__}")
    if examples is not None and (isinstance(examples, (str, dict)) or not all(
            isinstance(e, (list, tuple)) and len(e) == 2 and all(isinstance(x, str) for x in e) for e in examples)):
        raise ValueError("`examples` must be a list of (input, target) pairs of strings")
    if description is not None and not description.strip():
        if not examples:
            raise ValueError("`description` is empty; give a sentence that says what the task is")
        description = None  # the examples alone, as a few-shot file without a description gives
    if out is not None:
        check_output_dir(Path(out), overwrite)
    if add_to_library is not None:
        library.check_new_name(add_to_library, replace)
    net, meta = hypernet or load_hypernet(library)
    lora = generate_lora(library, description, examples, (net, meta))
    card_name = add_to_library or Path(out).name
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "adapter"
        folder.mkdir()
        save_peft_adapter(lora, net.cfg.rank, library.base_model, folder)
        card = Card.of_adapter(
            folder, name=card_name, description=description or f"synthesized from {len(examples)} examples",
            base_model=library.base_model, base_fingerprint=library.fingerprint, rank=net.cfg.rank,
            origin={"synthesized": True, "hypernet": _hypernet_id(library), "description": description or "",
                    "examples": [list(e) for e in examples or []]})
        (folder / CARD_FILE).write_text(card.to_json(), encoding="utf-8")
        if out is not None:
            with atomic_dir(Path(out), guard=lambda: check_output_dir(Path(out), overwrite)) as tmp:
                for file in folder.iterdir():
                    (tmp / file.name).write_bytes(file.read_bytes())
        if add_to_library:
            inputs = [i for i, _ in examples or [] if i.strip()]
            card = library.add(folder, name=add_to_library, examples=inputs or None, replace=replace)
    return card


def _hypernet_id(library: Library) -> dict:
    folder = library.path / HYPERNET_DIR
    return {"folder": f"{HYPERNET_DIR}/", "sha256": sha256_file(folder / HYPERNET_WEIGHTS)} \
        if (folder / HYPERNET_WEIGHTS).is_file() else {}


THRESHOLD_KEYS = {"compose": "compose_fallback", "route": "route_fallback"}
"""The library calibration that holds each threshold: compose's is on the candidates' best retrieval score
(description and shots), routing's on one input's best cosine with an expert's centroid."""


def fallback_threshold(library: Library, kind: str = "compose") -> float | None:
    """The retrieval score below which a synthesized adapter joins compose's candidates (`compose`) or replaces
    a routed input's experts (`route`): None when the library has no hypernetwork, none was calibrated, or the
    calibration was made with another hypernetwork (retrained since: say so, and fall back never)."""
    try:
        read_hypernet_meta(library)
    except LibraryError:  # no hypernetwork, or one for another model or embedder: no fallback
        return None
    entry = library.calibration(THRESHOLD_KEYS[kind])
    if entry is None or entry.get("value") is None:
        return None
    if entry.get("hypernet") != _hypernet_id(library):
        logger.warning("%s: the %s fallback threshold was calibrated with another hypernetwork; it is not used "
                       "until it is calibrated again", library.path, kind)
        return None
    return float(entry["value"])


def set_fallback_threshold(library: Library, threshold: float | None, evidence: dict, kind: str = "compose") -> None:
    """Store a calibrated threshold with the library (None: calibrated to never fall back, so routing embeds
    nothing extra), with its evidence and the hypernetwork it was calibrated with."""
    load_hypernet(library)  # refuses a missing or foreign hypernetwork
    library.set_calibration(THRESHOLD_KEYS[kind], threshold, evidence, hypernet=_hypernet_id(library))


def with_synthesized(stack: Stack, library: Library, description: str | None,
                     examples: list[tuple[str, str]]) -> Stack:
    """`stack` with one more candidate, SYNTHESIZED, generated from the description and the examples (padded
    to the stack's rank and modules, or they to its)."""
    lora = generate_lora(library, description, examples)
    experts = [{m: (A[k], B[k]) for m, (A, B) in stack.modules.items()} for k in range(len(stack.names))]
    return stacked(stack.names + [SYNTHESIZED], experts + [lora], library.base_shapes)

def read_examples(path: Path) -> list[tuple[str, str]]:
    """(input, target) pairs from a few-shot file (.jsonl) or a task file."""
    from lorahub_plus.tasks import load_task

    return [(ex.input, ex.target) for ex in load_task(path).examples]

