"""An adapter library: a folder of PEFT adapter folders, each with a card, plus FAISS indexes.

Layout::

    library.json            base model id, its linear-module shapes, the embedder
    <expert>/               adapter_config.json, adapter_model.safetensors, card.json,
                            embeddings.safetensors (description and input-centroid vectors)
    index/                  description.faiss, centroid.faiss, names.json (with a digest of
                            every expert's embeddings and of the index files)

Every write holds `.lock` and lands by rename (see `atomic`), so concurrent writers lose nothing
and a failed operation leaves the library as it was. Crash consistency comes from ordering,
renames and recovery on open, under the lock: an expert folder lands whole in one rename, the
index is derived data, and opening a library finishes or undoes whatever a killed writer left
(`repair`): leftovers are deleted or renamed back, and an index whose digest does not match the
experts is rebuilt from their stored vectors. So after a kill at any point a library opens in
the state before the operation or after it, complete and indexed. `Library(path, recover=False)`
leaves it as found, for `verify` to report.
"""
from __future__ import annotations

import hashlib
import json
import math
import logging
import os
import re
import shutil
import typing
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from safetensors.torch import save_file

from lorahub_plus.version import __version__
from lorahub_plus.library.adapters import (CONFIG_FILE, WEIGHTS_FILE, check_shapes, check_target_modules, lora_shapes, module_shapes, read_adapter, resolve_adapter)
from lorahub_plus.library.atomic import (ASIDE, COMMIT, LEFTOVER, atomic_dir, atomic_write_text, discard, remove_tree, set_aside)
from lorahub_plus.errors import IncompatibleAdapterError, LibraryError
from lorahub_plus.library.index import build_index, read_index, search_index, write_index
from lorahub_plus.library.readers import check_field, check_whole, parse_json, read_json, read_safetensors, sha256_file

logger = logging.getLogger(__name__)

LIBRARY_FILE, CARD_FILE, EMBEDDINGS_FILE, INDEX_DIR = "library.json", "card.json", "embeddings.safetensors", "index"
NAMES_FILE, INDEX_KINDS = "names.json", ("description", "centroid")
PENDING_EMBEDDINGS, PENDING_LIBRARY = ".pending-" + EMBEDDINGS_FILE, ".pending-" + LIBRARY_FILE
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CALIBRATION_FILE = "calibration.json"
"""Thresholds derived from the library's own data (`library calibrate`), each with its evidence."""
COMPOSITIONS_DIR = "compositions"
"""Named compositions: each a JSON file of expert weights (a mixture), served by name."""
RESERVED = frozenset({LIBRARY_FILE, INDEX_DIR, "README.md", "select.json", "accuracy.png", ".lock", COMPOSITIONS_DIR,
                      CALIBRATION_FILE})
"""The library's own files and folders: never an expert's name, whatever the flags."""


def linear_shapes(model) -> dict[str, list[int]]:
    """{module name: [in_features, out_features]} of every linear map an expert may adapt (not lm_head)."""
    return {name: shape for name, shape in module_shapes(model).items() if not name.endswith("lm_head")}


def vectors_identity(file: Path) -> dict | None:
    """The embedder identity an embeddings file records in its metadata (None: an older file, none recorded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            raw = (f.metadata() or {}).get("embedder_identity")
    except Exception as e:  # read_vectors names what is wrong with the file
        raise LibraryError(f"{file}: not a readable safetensors file ({e})") from e
    return None if raw is None else check_field(parse_json(raw, f"{file}: metadata `embedder_identity`"), dict,
                                                str(file), "metadata.embedder_identity", LibraryError)


def save_vectors(vectors: dict[str, torch.Tensor], file: Path, identity: dict) -> None:
    """An embeddings file, recording the embedder that made its vectors."""
    save_file({k: v.float().contiguous() for k, v in vectors.items()}, str(file),
              metadata={"embedder_identity": json.dumps(identity)})


def read_vectors(file: Path) -> dict[str, torch.Tensor]:
    """An embeddings file's tensors, each checked to be a non-empty 1-D float vector, as float32."""
    vectors = read_safetensors(file)
    for key, value in vectors.items():
        if value.dim() != 1 or not value.is_floating_point() or len(value) == 0:
            raise LibraryError(f"{file}: tensor `{key}` must be a 1-D float vector, got {value.dtype} "
                               f"{tuple(value.shape)}")
    return {k: v.float() for k, v in vectors.items()}


def shapes_fingerprint(shapes: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def is_local_path(name: str) -> bool:
    """A base model recorded as a path of some machine, not a hub id."""
    return os.path.isabs(name) or name.startswith(("~", ".")) or Path(name).exists()


def card_text(card: "Card") -> str:
    """What the description index embeds: the name in words, the description, the keywords."""
    words = re.sub(r"[_:.\-]+", " ", card.name)
    return f"{words}: {card.description} Keywords: {', '.join(card.keywords)}."


@dataclass
class Card:
    name: str = field(metadata={"help": "unique name in the library"})
    description: str = field(metadata={"help": "what the adapter does, one or two sentences"})
    keywords: list[str] = field(default_factory=list, metadata={"help": "search keywords"})
    base_model: str = field(default="", metadata={"help": "base model id the adapter was trained on"})
    base_fingerprint: str = field(default="", metadata={"help": "hash of the base model's linear shapes"})
    modules: dict = field(default_factory=dict, metadata={"help": "{module: [in, out, r]}"})
    rank: int = field(default=0, metadata={"help": "LoRA rank r"})
    target_modules: list[str] = field(default_factory=list, metadata={"help": "adapted module names"})
    source_task: str = field(default="", metadata={"help": "task the adapter was trained on"})
    metrics: dict = field(default_factory=dict, metadata={"help": "held-out accuracy of expert and base"})
    sha256: str = field(default="", metadata={"help": "sha256 of adapter_model.safetensors"})
    created: str = field(default="", metadata={"help": "creation time, ISO 8601 UTC"})
    origin: dict = field(default_factory=dict, metadata={
        "help": "where the weights came from when not trained on a task: {'synthesized': true, 'hypernet': ..., "
                "'description': ..., 'examples': n}"})
    lorahub_plus_version: str = field(default=__version__, metadata={"help": "version that wrote the card"})

    @classmethod
    def read(cls, path: Path) -> "Card":
        raw = read_json(path)
        hints = typing.get_type_hints(cls)
        for key in ("name", "description"):
            if key not in raw:
                raise LibraryError(f"{path}: missing field `{key}` (a string)")
        for f in fields(cls):
            if f.name in raw:
                kind = typing.get_origin(hints[f.name]) or hints[f.name]
                item = typing.get_args(hints[f.name])[0] if kind is list else None
                check_field(raw[f.name], kind, str(path), f.name, LibraryError, item=item)
        for key in ("base_accuracy", "expert_accuracy"):  # what `library list` and the summary print
            check_field(raw.get("metrics", {}).get(key, 0.0), (int, float), str(path), f"metrics.{key}", LibraryError)
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def of_adapter(cls, folder: Path, **fields) -> "Card":
        """The card of the PEFT adapter in `folder`: its modules, rank, target modules and sha256 read from its
        weights, the time now; `fields` give the rest (name, description, base model, metrics, ...)."""
        weights = folder / WEIGHTS_FILE
        shapes = lora_shapes(read_safetensors(weights), str(weights))
        fields.setdefault("rank", max(r for *_, r in shapes.values()))
        fields.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return cls(modules=shapes, target_modules=sorted({m.rsplit(".", 1)[-1] for m in shapes}),
                   sha256=sha256_file(weights), **fields)


@dataclass
class Hit:
    name: str
    score: float
    card: Card


class Library:
    """A folder of experts. `Library(path)` opens one (repairing what a crash left);
    `Library.create(path, model)` starts one."""

    def __init__(self, path: str | os.PathLike, embedder=None, recover: bool = True):
        self.path = Path(path)
        meta_file = self.path / LIBRARY_FILE
        if not meta_file.is_file():
            raise LibraryError(f"{self.path}: not a library (no `{LIBRARY_FILE}`); create one with `library init`")
        self.meta = read_json(meta_file)
        where = str(meta_file)
        self.base_model = check_field(self.meta.get("base_model"), str, where, "base_model", LibraryError)
        self.base_shapes = check_field(self.meta.get("modules"), dict, where, "modules", LibraryError)
        check_field(self.meta.get("fingerprint"), str, where, "fingerprint", LibraryError)
        check_field(self.meta.get("embedder"), (str, type(None)), where, "embedder", LibraryError)
        for module, shape in self.base_shapes.items():
            check_field(shape, list, where, f"modules.{module}", LibraryError, item=int)
            if len(shape) != 2 or min(shape) < 1:
                raise LibraryError(f"{where}: field `modules.{module}` must be [in_features, out_features], two "
                                   f"whole numbers >= 1, got {shape}")
        if self.meta.get("embedder_identity") is not None:
            check_field(self.meta["embedder_identity"], dict, where, "embedder_identity", LibraryError)
        self._embedder = embedder
        self._identity = None
        self._table = None  # (key, names, description matrix, centroid matrix): the retrieval scorer's vectors
        self._indexes = {}  # {kind: (key, names, faiss index)}: what `_index` read, kept until the files change
        self._lock = FileLock(str(self.path / ".lock"), timeout=600)
        if recover and self._needs_repair():
            with self.transaction():
                self._recover()

    @classmethod
    def create(cls, path: str | os.PathLike, model, load_from: str | None = None, embedder_name: str | None = None,
               embedder=None) -> "Library":
        """Start an empty library for `model`; `load_from` is what load_base_model takes (None: the default)."""
        from lorahub_plus.models import base_model_id

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LibraryError(f"{path}: is a file; a library is created in a new or empty folder")
        path.mkdir(parents=True, exist_ok=True)
        if (path / LIBRARY_FILE).exists():
            raise LibraryError(f"{path}: a library already exists here")
        if any(path.iterdir()):  # a library owns its folder: its names and leftover rules must not touch a user's files
            raise LibraryError(f"{path}: not empty; a library is created in a new or empty folder")
        shapes = linear_shapes(model)
        from lorahub_plus.models import embedder_identity, load_embedder

        embedder = embedder or load_embedder(embedder_name)
        meta = {"format": 1, "base_model": base_model_id(model), "load_from": load_from,
                "fingerprint": shapes_fingerprint(shapes), "embedder": embedder_name,
                "embedder_identity": embedder_identity(embedder, embedder_name), "modules": shapes}
        atomic_write_text(path / LIBRARY_FILE, json.dumps(meta, indent=1) + "\n")
        library = cls(path, embedder, recover=False)
        with library.transaction():
            library._write_indexes()  # an empty index: a library always has one
        return library

    # -- reading ---------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def embedder(self):
        """The sentence embedder the library's vectors were made with (checked against the recorded identity)."""
        if self._embedder is None:
            from lorahub_plus.models import load_embedder

            embedder = load_embedder(self.meta.get("embedder"))
            self._check_identity(embedder)
            self._embedder = embedder
        return self._embedder

    @property
    def embedder_identity(self) -> dict:
        """The embedder's name, dimension and probe vector (`models.embedder_identity`), as recorded at creation."""
        if self._identity is None:
            from lorahub_plus.models import embedder_identity

            self._identity = self.meta.get("embedder_identity") or embedder_identity(self.embedder,
                                                                                     self.meta.get("embedder"))
        return self._identity

    def _check_identity(self, embedder) -> None:
        from lorahub_plus.models import embedder_identity, same_embedder

        recorded = self.meta.get("embedder_identity")
        if recorded and not same_embedder(recorded, embedder_identity(embedder)):
            raise LibraryError(f"{self.path / LIBRARY_FILE}: field `embedder_identity`: the library's vectors were "
                               f"made by another embedder than {self.meta.get('embedder') or 'the default'} gives now "
                               "(a changed model folder?); searching would mix two spaces. Restore it, or re-embed "
                               "with `lorahub-plus library reindex`")

    def check_vectors(self, file: Path) -> None:
        """Refuse an embeddings file whose vectors another embedder made (an older file records none: accepted)."""
        from lorahub_plus.models import same_embedder

        identity = vectors_identity(file)
        if identity is not None and not same_embedder(identity, self.embedder_identity):
            raise LibraryError(f"{file}: metadata `embedder_identity`: made by another embedder ({identity.get('name')}, "
                               f"{identity.get('dim')} dimensions) than the library's "
                               f"({self.embedder_identity.get('name')}, {self.embedder_identity.get('dim')}); give "
                               "`examples` to embed the centroid again")

    # -- calibration -----------------------------------------------------------------------------
    def calibration(self, key: str) -> dict | None:
        """A stored threshold: {"value", "evidence", ...} (`library calibrate`), or None when not calibrated."""
        file = self.path / CALIBRATION_FILE
        entry = read_json(file).get(key) if file.is_file() else None
        if entry is not None:
            check_field(entry, dict, str(file), key, LibraryError)
            check_field(entry.get("value"), (int, float, type(None)), str(file), f"{key}.value", LibraryError)
        return entry

    def set_calibration(self, key: str, value: float | None, evidence: dict, **extra) -> None:
        """Store one threshold with its evidence; the others stay as they are."""
        file = self.path / CALIBRATION_FILE
        with self.transaction():
            stored = read_json(file) if file.is_file() else {}
            stored[key] = {"value": None if value is None else float(value), **extra, "evidence": evidence}
            atomic_write_text(file, json.dumps(stored, indent=1) + "\n")

    def names(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if self._is_expert(p.name))

    def _is_expert(self, name: str) -> bool:
        return bool(NAME.match(name)) and name not in RESERVED and (self.path / name / CARD_FILE).is_file()

    def _folder(self, name: str) -> Path:
        """An expert's folder, found without reading it (so a damaged one can still be removed)."""
        if not self._is_expert(name):
            raise LibraryError(f"{self.path}: no expert named {name!r}")
        return self.path / name

    def card(self, name: str) -> Card:
        return Card.read(self._folder(name) / CARD_FILE)

    def cards(self) -> list[Card]:
        return [self.card(n) for n in self.names()]

    def expert_path(self, name: str) -> Path:
        self.card(name)
        return self.path / name

    def vectors(self, name: str) -> dict[str, torch.Tensor]:
        """An expert's stored embeddings, each a 1-D float32 vector ({} when it has none)."""
        file = self.path / name / EMBEDDINGS_FILE
        return read_vectors(file) if file.is_file() else {}

    def __len__(self) -> int:
        return len(self.names())

    # -- checking --------------------------------------------------------------------------------
    def check_compatible(self, shapes: dict[str, list[int]], source: str) -> None:
        """Refuse an adapter whose modules are missing from, or shaped unlike, the base model."""
        check_shapes(shapes, self.base_shapes, source, self.base_model)

    def check_adapter(self, folder: Path, mismatch_ok: bool = False) -> tuple[dict, dict[str, list[int]]]:
        """(config, shapes) of an adapter folder that this library can hold, checked as `add` and `verify`
        check it: config and weights (`read_adapter`: ranks, finite values), `target_modules` against the
        weights, shapes against the base model, and the base model it names: another model's adapter is
        refused unless `mismatch_ok` (and then it is recorded on the card)."""
        config, weights = read_adapter(folder, check_card=False)
        shapes = lora_shapes(weights, str(folder / WEIGHTS_FILE))
        check_target_modules(config, shapes, str(folder / CONFIG_FILE))
        self.check_compatible(shapes, str(folder))
        named = self.recorded_base(config.get("base_model_name_or_path"))
        if named != self.base_model and not mismatch_ok:
            raise IncompatibleAdapterError(
                f"{folder / CONFIG_FILE}: field `base_model_name_or_path` names {named!r}, but this library's base "
                f"model is {self.base_model!r}; an adapter trained on another model (even one of the same shapes) "
                "is rarely of use: pass `--base-model-mismatch ok` to add it anyway (the card records it)")
        return config, shapes

    def _needs_repair(self) -> bool:
        """A look without the lock: a writer may be mid-operation, so anything odd (even a folder that
        vanishes while we look) means: take the lock and look again."""
        try:
            return bool(self._leftovers() or self._index_problems())
        except (OSError, LibraryError):
            return True

    def _recover(self) -> None:
        """Under the lock: finish or undo what a killed writer left. Every write starts with it."""
        if self._leftovers() or self._index_problems():
            logger.warning("%s: recovered from an interrupted write: %s", self.path, "; ".join(self.repair()))

    def _leftovers(self) -> list[Path]:
        """What an interrupted write left (see `atomic`), here and in expert folders."""
        found = [p for p in self.path.iterdir() if LEFTOVER.match(p.name) or p.name == COMMIT]
        return found + [p for n in self.names() for p in (self.path / n).iterdir() if LEFTOVER.match(p.name)]

    def _digest(self) -> str:
        """What the index was built from: every expert's name and embeddings file."""
        digest = hashlib.sha256()
        for name in self.names():
            file = self.path / name / EMBEDDINGS_FILE
            digest.update(f"{name}:{sha256_file(file) if file.is_file() else '-'}\n".encode())
        return digest.hexdigest()

    def _index_problems(self) -> list[str]:
        names_file = self.path / INDEX_DIR / NAMES_FILE
        if not names_file.is_file():
            return [f"{self.path / INDEX_DIR}: no index (run `lorahub-plus library repair`)"]
        try:
            recorded = read_json(names_file)
        except LibraryError as e:
            return [str(e)]
        if recorded.get("digest") != self._digest():
            return [f"{names_file}: the index does not match the experts (run `lorahub-plus library repair`)"]
        files = recorded.get("files") if isinstance(recorded.get("files"), dict) else {}
        return [f"{self.path / INDEX_DIR / f'{kind}.faiss'}: missing or damaged (sha256 differs from {names_file})"
                for kind in INDEX_KINDS if not (self.path / INDEX_DIR / f"{kind}.faiss").is_file()
                or files.get(kind) != sha256_file(self.path / INDEX_DIR / f"{kind}.faiss")]

    def verify(self) -> list[str]:
        """Every problem found: checksums, shapes, configs and base model against card, the index
        against the experts, and leftovers of interrupted writes."""
        problems = []
        with self.transaction():
            for name in self.names():
                where = self.path / name
                try:
                    card = self.card(name)
                    config, shapes = self.check_adapter(where, mismatch_ok=True)  # the base model: below
                    self.vectors(name)
                    if sha256_file(where / WEIGHTS_FILE) != card.sha256:
                        problems.append(f"{where / WEIGHTS_FILE}: sha256 differs from card field `sha256`")
                    if shapes != card.modules:
                        problems.append(f"{where / CARD_FILE}: field `modules` differs from the weights' shapes")
                    if config["r"] != card.rank:
                        problems.append(f"{where / CARD_FILE}: field `rank` {card.rank} != adapter_config r {config['r']}")
                    if card.name != name:
                        problems.append(f"{where / CARD_FILE}: field `name` {card.name!r} != folder name {name!r}")
                    if card.base_fingerprint != self.fingerprint:
                        problems.append(f"{where / CARD_FILE}: field `base_fingerprint` != library fingerprint")
                    for file, recorded in ((CARD_FILE, card.base_model),
                                           (CONFIG_FILE, config.get("base_model_name_or_path"))):
                        if recorded != self.base_model:
                            problems.append(f"{where / file}: names base model {recorded!r}, the library's is "
                                            f"{self.base_model!r} (`library repair` rewrites a local path)")
                except (LibraryError, IncompatibleAdapterError) as e:
                    problems.append(str(e))
            problems += self._index_problems()
            problems += [f"{p}: left by an interrupted write (run `lorahub-plus library repair`)"
                         for p in self._leftovers()]
        return problems

    # -- writing ---------------------------------------------------------------------------------
    @contextmanager
    def transaction(self):
        """Hold the library's lock for the block: one writer at a time, across processes. What a block writes
        lands by rename (`atomic`), so a crash leaves each file whole, before or after."""
        try:
            self._lock.acquire(timeout=2)
        except Timeout:  # say why nothing happens, then wait the lock's own timeout
            logger.warning("%s: waiting for the library lock (another lorahub-plus holds it)", self.path)
            self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def artefact(self, name: str):
        """Write a library-wide artefact (`gate`, `hypernet`, ...): yields an empty folder that replaces
        `<library>/<name>/` whole when the block ends, under the lock; an error leaves the old one."""
        if not isinstance(name, str) or not NAME.match(name) or name in RESERVED:
            raise LibraryError(f"an artefact's name must match {NAME.pattern} and not be one of the library's own "
                               f"files {sorted(RESERVED)}, got {name!r}")
        with self.transaction():
            if (self.path / name / CARD_FILE).is_file():
                raise LibraryError(f"{self.path / name}: an expert has that name; an artefact takes another")
            with atomic_dir(self.path / name) as tmp:
                yield tmp

    def repair(self) -> list[str]:
        """Finish or undo interrupted writes, give experts recorded with a local base-model path the
        library's id, and rebuild a stale index. Returns what was done."""
        done = []
        with self.transaction():
            if (self.path / COMMIT).exists():
                self._commit()
                done.append("finished a committed reindex")
            for path in self._leftovers():
                aside = ASIDE.match(path.name)
                if aside and not (path.parent / aside["name"]).exists():
                    os.replace(path, path.parent / aside["name"])
                    done.append(f"put back {path.parent / aside['name']}")
                else:
                    (remove_tree if path.name.startswith(".trash-") else discard)(path)
                    done.append(f"deleted {path}")
            for name in self.names():
                try:
                    done += self._fix_base_model(name)
                except LibraryError as e:  # a damaged expert must not block the repair of the rest
                    done.append(f"left as is: {e} (`library verify` lists it; `library remove` deletes it)")
            if self._index_problems():
                self._write_indexes()
                done.append("rebuilt the index")
        return done

    def recorded_base(self, name: str | None) -> str:
        """The base model an expert records: its own id, but the library's for none or a local path (a
        build machine's cache), since its shapes were checked against the library's on add."""
        return self.base_model if not name or is_local_path(name) else name

    def _fix_base_model(self, name: str) -> list[str]:
        done = []
        for file, key in ((CARD_FILE, "base_model"), (CONFIG_FILE, "base_model_name_or_path")):
            path = self.path / name / file
            raw = read_json(path)
            if isinstance(raw.get(key), str) and raw[key] != self.recorded_base(raw[key]):
                raw[key] = self.recorded_base(raw[key])
                atomic_write_text(path, json.dumps(raw, indent=2) + "\n")
                done.append(f"{path}: `{key}` set to {raw[key]!r}")
        return done

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of `texts` from the library's own embedder (float32, one row each)."""
        return self.embedder.encode(texts, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)

    def add(self, source: str | os.PathLike, name: str | None = None, description: str | None = None,
            keywords: list[str] | None = None, examples: list[str] | None = None,
            replace: bool = False, base_model_mismatch: bool = False) -> Card:
        """Copy a PEFT adapter folder (or hub id) into the library, with a card, and reindex.

        A card.json beside the adapter supplies what the arguments leave out; `examples` (input
        texts) give the expert an input centroid for example-based retrieval. The adapter is checked as
        `verify` checks it (`check_adapter`); one made for another base model only with `base_model_mismatch`.
        """
        for arg, value, item in (("description", description, None), ("keywords", keywords, str),
                                 ("examples", examples, str)):  # a bare string would be read letter by letter
            if value is not None:
                check_field(value, (list, tuple) if item else str, "Library.add", arg, LibraryError, item=item)
        if examples is not None and not all(e.strip() for e in examples):
            raise LibraryError("Library.add: field `examples` holds a blank text (a centroid of nothing)")
        if name is not None and not (isinstance(name, str) and name.strip()):
            raise LibraryError(f"Library.add: field `name` must be a non-empty expert name, got {name!r}")
        folder = resolve_adapter(source)
        config, shapes = self.check_adapter(folder, base_model_mismatch)
        given = Card.read(folder / CARD_FILE) if (folder / CARD_FILE).is_file() else None
        name = name or (given.name if given else folder.name)
        origin = dict(given.origin) if given else {}
        if self.recorded_base(config.get("base_model_name_or_path")) != self.base_model:
            origin["base_model_mismatch"] = config["base_model_name_or_path"]
        self.check_new_name(name, replace)
        description = description or (given.description if given else "")
        if not description.strip():
            raise LibraryError(f"{folder}: no description (pass `description` or add a card.json)")
        config["base_model_name_or_path"] = self.base_model  # checked above: the same model, or a recorded mismatch
        card = Card.of_adapter(
            folder, name=name, description=description, rank=config["r"],
            keywords=list(keywords if keywords is not None else (given.keywords if given else [])),
            base_model=config["base_model_name_or_path"], base_fingerprint=self.fingerprint,
            source_task=given.source_task if given else "", metrics=given.metrics if given else {}, origin=origin,
            **({"created": given.created} if given and given.created else {}))
        vectors = {"description": torch.from_numpy(self.embed([card_text(card)])[0])}
        if examples:
            vectors["centroid"] = torch.from_numpy(self.centroid(examples))
        elif (folder / EMBEDDINGS_FILE).is_file() and "centroid" in (old := read_vectors(folder / EMBEDDINGS_FILE)):
            self.check_vectors(folder / EMBEDDINGS_FILE)
            if len(old["centroid"]) != len(vectors["description"]):
                raise LibraryError(f"{folder / EMBEDDINGS_FILE}: tensor `centroid` has {len(old['centroid'])} "
                                   f"dimensions, the library's embedder gives {len(vectors['description'])}")
            vectors["centroid"] = old["centroid"]
        with self.transaction():
            self._recover()
            self.check_new_name(name, replace)
            dest = self.path / name
            with atomic_dir(dest, then=self._write_indexes) as tmp:
                shutil.copy2(folder / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
                (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
                save_vectors(vectors, tmp / EMBEDDINGS_FILE, self.embedder_identity)
                (tmp / CARD_FILE).write_text(card.to_json(), encoding="utf-8")
        return card

    def compositions(self) -> dict[str, dict]:
        """{name: {"weights": {expert: weight}, ...}} of the saved compositions (`save_composition`)."""
        folder = self.path / COMPOSITIONS_DIR
        out = {}
        for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                raw = read_json(file)
                weights = check_field(raw.get("weights"), dict, str(file), "weights", LibraryError)
                check_field(list(weights.values()), list, str(file), "weights", LibraryError, item=(int, float))
            except LibraryError as e:  # one damaged file hides that composition only
                logger.warning("skipping a composition: %s", e)
                continue
            out[file.stem] = raw
        return out

    def save_composition(self, name: str, weights: dict[str, float], meta: dict | None = None,
                         replace: bool = False) -> Path:
        """Save a mixture of this library's experts under `name` (atomic, under the lock)."""
        if not isinstance(name, str) or not NAME.match(name) or name in RESERVED:
            raise LibraryError(f"`name` must match {NAME.pattern} (letters, digits, _ . -), got {name!r}")
        unknown = sorted(set(weights) - set(self.names()))
        if unknown or not weights or not all(math.isfinite(w) for w in weights.values()):
            raise LibraryError(f"a composition weighs experts of {self.path} by finite numbers; unknown: {unknown}")
        path = self.path / COMPOSITIONS_DIR / f"{name}.json"
        with self.transaction():
            if path.exists() and not replace:
                raise LibraryError(f"{self.path}: a composition named {name!r} exists already (use replace)")
            if name in self.names():
                raise LibraryError(f"{self.path}: an expert is named {name!r}; a composition takes another name")
            path.parent.mkdir(exist_ok=True)
            atomic_write_text(path, json.dumps({"weights": weights, **(meta or {})}, indent=1) + "\n")
        return path

    def check_new_name(self, name: str, replace: bool = False) -> None:
        """Refuse, before any work, a name an expert cannot take: not a plain folder name, one of the library's
        own files, a folder that is not an expert, or (without replace) an existing expert."""
        if not isinstance(name, str) or not NAME.match(name) or name in RESERVED:
            raise LibraryError(f"`name` must match {NAME.pattern} (letters, digits, _ . -) and not be one of the "
                               f"library's own files {sorted(RESERVED)}, got {name!r}")
        dest = self.path / name
        if dest.exists() and not (dest / CARD_FILE).is_file():
            raise LibraryError(f"{dest}: exists and is not an expert; it is never replaced")
        if dest.exists() and not replace:
            raise LibraryError(f"{self.path}: an expert named {name!r} exists already (use replace)")

    def remove(self, name: str) -> None:
        """Delete an expert, even one whose files are damaged, and reindex."""
        with self.transaction():
            self._recover()
            with set_aside(self._folder(name)):
                self._write_indexes()

    def reindex(self) -> None:
        """Re-embed every card's description with the library's embedder as it is now (it may have changed),
        record that embedder, and rebuild the indexes. A centroid another embedder made is dropped (its inputs
        are not kept): that expert is found by its description until it is added again with `examples`.

        Many files change, so this one write has a commit point: every expert's new vectors and the new
        library.json go to `.pending-*` first, then `.commit` appears, then they replace the old ones (`_commit`)."""
        from lorahub_plus.models import embedder_identity, load_embedder, same_embedder

        self._embedder = self._embedder or load_embedder(self.meta.get("embedder"))  # unchecked: it may differ
        new = embedder_identity(self._embedder, self.meta.get("embedder"))
        with self.transaction():
            self._recover()
            for name in self.names():
                file = self.path / name / EMBEDDINGS_FILE
                vectors = self.vectors(name)
                made_by = (vectors_identity(file) if file.is_file() else None) or self.meta.get("embedder_identity")
                if "centroid" in vectors and made_by is not None and not same_embedder(made_by, new):
                    logger.warning("%s: its centroid was made by another embedder; dropped (add it again with "
                                   "`examples` to route by its inputs)", name)
                    del vectors["centroid"]
                vectors["description"] = torch.from_numpy(self.embed([card_text(self.card(name))])[0])
                save_vectors(vectors, self.path / name / PENDING_EMBEDDINGS, new)
            atomic_write_text(self.path / PENDING_LIBRARY, json.dumps({**self.meta, "embedder_identity": new},
                                                                      indent=1) + "\n")
            atomic_write_text(self.path / COMMIT, "reindex\n")
            self._commit()

    def _commit(self) -> None:
        """Roll a committed reindex forward (idempotent, so a crash here is finished on the next open)."""
        for name in self.names():
            if (self.path / name / PENDING_EMBEDDINGS).exists():
                os.replace(self.path / name / PENDING_EMBEDDINGS, self.path / name / EMBEDDINGS_FILE)
        if (self.path / PENDING_LIBRARY).exists():  # the embedder the new vectors were made with
            os.replace(self.path / PENDING_LIBRARY, self.path / LIBRARY_FILE)
            self.meta = read_json(self.path / LIBRARY_FILE)
            self._identity = self.meta.get("embedder_identity")
        self._write_indexes()
        os.unlink(self.path / COMMIT)

    def _write_indexes(self) -> None:
        """Rebuild both indexes from the experts' stored vectors (no re-embedding); the index folder
        is replaced whole, so its files and names.json always agree."""
        names, rows = {kind: [] for kind in INDEX_KINDS}, {kind: [] for kind in INDEX_KINDS}
        stored = {}
        for name in self.names():
            try:
                stored[name] = self.vectors(name)
            except LibraryError as e:  # one damaged expert must not lock everyone out: it stays unindexed
                logger.warning("%s (left out of the index; `library verify` lists it)", e)
        dims = Counter(len(v) for vectors in stored.values() for v in vectors.values())
        dim = dims.most_common(1)[0][0] if dims else self.embedder.get_embedding_dimension()
        for name, vectors in stored.items():
            for kind in INDEX_KINDS:
                if kind in vectors and len(vectors[kind]) == dim:
                    names[kind].append(name)
                    rows[kind].append(vectors[kind].numpy())
                elif kind in vectors:
                    logger.warning("%s: `%s` has %d dimensions, the library's have %d (left out of the index)",
                                   self.path / name / EMBEDDINGS_FILE, kind, len(vectors[kind]), dim)
        with atomic_dir(self.path / INDEX_DIR) as tmp:
            files = {}
            for kind, vecs in rows.items():
                write_index(build_index(np.stack(vecs) if vecs else np.zeros((0, dim), np.float32)), tmp / f"{kind}.faiss")
                files[kind] = sha256_file(tmp / f"{kind}.faiss")
            (tmp / NAMES_FILE).write_text(json.dumps({**names, "digest": self._digest(), "files": files}, indent=1) + "\n")
        self._indexes.clear()

# -- searching -------------------------------------------------------------------------------
    # -- retrieval: one scorer for compose, the routers and the benchmarks --------------------------
    def _vectors_table(self, names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(descriptions (N, d), centroids (N, d), has_centroid (N,)) of `names`, kept until a file changes."""
        files = [self.path / n / EMBEDDINGS_FILE for n in names]
        key = tuple((str(f), f.stat().st_mtime_ns if f.is_file() else None) for f in files)
        if self._table is None or self._table[0] != key:
            stored = [self.vectors(n) for n in names]
            missing = [n for n, v in zip(names, stored) if "description" not in v]
            if missing:
                raise LibraryError(f"{self.path}: experts without a description vector: {missing} "
                                   "(run `lorahub-plus library reindex`)")
            descriptions = np.stack([v["description"].numpy() for v in stored])
            has = np.array(["centroid" in v for v in stored])
            centroids = np.stack([v["centroid"].numpy() if "centroid" in v else np.zeros_like(descriptions[0])
                                  for v in stored])
            self._table = (key, descriptions, centroids, has)
        return self._table[1:]

    def scores(self, description: str | None = None, inputs: list[str] | None = None,
               names: list[str] | None = None) -> dict[str, float]:
        """The retrieval score of every expert (or of `names`): the mean of two cosines, the description's with
        the expert's card and the inputs' centroid's with the expert's input centroid; the one given stands alone,
        as the description does for an expert added without examples. Exact, over the stored vectors."""
        if not description and not inputs:
            raise ValueError("retrieval needs a description or example inputs")
        names = list(names if names is not None else self.names())
        if not names:
            return {}
        descriptions, centroids, has = self._vectors_table(names)
        total, count = np.zeros(len(names)), np.zeros(len(names))
        if description:
            total += descriptions @ self.embed([description])[0]
            count += 1
        if inputs:
            total += np.where(has, centroids @ self.centroid(inputs), 0.0)
            count += has
        return {n: float(s / c) for n, s, c in zip(names, total, count) if c}

    def similarities(self, texts: list[str], names: list[str]) -> np.ndarray:
        """(len(texts), len(names)): each text's own cosine with each expert's input centroid (its description
        where it has none), for routing one input at a time."""
        descriptions, centroids, has = self._vectors_table(list(names))
        keys = np.where(has[:, None], centroids, descriptions)
        return self.embed(list(texts)) @ keys.T

    def centroid(self, texts: list[str]) -> np.ndarray:
        """Unit mean of the texts' unit embeddings: where an expert's inputs live."""
        mean = self.embed(list(texts)).mean(0)
        return mean / max(np.linalg.norm(mean), 1e-12)

    def _index(self, kind: str) -> tuple[list[str], object]:
        """The expert names of the `kind` FAISS index's rows, and the index: read and checksummed once, then kept
        while names.json and the index file are the same files (inode, mtime, size). Every write replaces the index
        folder whole, with new files, so an expert added or a reindex, by this process or another, is read anew."""
        names_file, index_file = self.path / INDEX_DIR / NAMES_FILE, self.path / INDEX_DIR / f"{kind}.faiss"
        with self.transaction():  # the index and its names change together under the lock
            if not names_file.is_file():
                raise LibraryError(f"{self.path}: no index; run `lorahub-plus library repair`")
            key = tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in
                        (os.stat(f) for f in (names_file, index_file) if f.is_file()))
            cached = self._indexes.get(kind)
            if cached is not None and cached[0] == key:  # a missing index file never matches: read_index says so
                return cached[1], cached[2]
            recorded = read_json(names_file)
            names = check_field(recorded.get(kind), list, str(names_file), kind, LibraryError, item=str)
            files = check_field(recorded.get("files"), dict, str(names_file), "files", LibraryError)
            index = read_index(index_file, sha256=str(files.get(kind)), recorded_in=names_file)
        if index.ntotal != len(names):
            raise LibraryError(f"{names_file}: lists {len(names)} `{kind}` experts, the index holds {index.ntotal}; "
                               "run `lorahub-plus library repair`")
        self._indexes[kind] = (key, names, index)
        return names, index

    def _search(self, kind: str, query: np.ndarray, k: int) -> list[Hit]:
        check_whole("k", k)
        names, index = self._index(kind)
        names_file = self.path / INDEX_DIR / NAMES_FILE
        scores, ids = search_index(index, query[None], k)
        hits = [(names[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        unknown = [n for n, _ in hits if not self._is_expert(n)]  # k checks, not a listing of every expert
        if unknown:
            raise LibraryError(f"{names_file}: lists {unknown}, not experts of this library; run "
                               "`lorahub-plus library repair`")
        return [Hit(n, s, self.card(n)) for n, s in hits]

    def search(self, description: str, k: int = 5) -> list[Hit]:
        """Experts whose cards are closest to a task description (cosine similarity)."""
        if not isinstance(description, str) or not description.strip():
            raise ValueError(f"`description` must be a non-empty text saying what the task is, got {description!r}")
        return self._search("description", self.embed([description])[0], k)

    def search_by_examples(self, inputs: list[str], k: int = 5) -> list[Hit]:
        """Experts whose training inputs lie closest to these inputs (centroid cosine similarity)."""
        if not inputs or not all(isinstance(x, str) and x.strip() for x in inputs):
            raise ValueError("`inputs` must be a non-empty list of non-empty texts")
        return self._search("centroid", self.centroid(inputs), k)
