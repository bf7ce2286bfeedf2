"""An adapter library: a folder of PEFT adapter folders, each with a card, plus FAISS indexes.

Layout::

    library.json            base model id, its linear-module shapes, the embedder
    <expert>/               adapter_config.json, adapter_model.safetensors, card.json,
                            embeddings.safetensors (description and input-centroid vectors)
    index/                  description.faiss, centroid.faiss, names.json

Every write holds `.lock` and lands by rename, so concurrent writers lose nothing and a failed
operation leaves the library as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_dir, atomic_file, atomic_write_text, set_aside
from .adapters import CONFIG_FILE, WEIGHTS_FILE, lora_shapes, read_adapter, resolve_adapter
from .errors import IncompatibleAdapterError, LibraryError
from .index import build_index, read_index, search_index, write_index

LIBRARY_FILE, CARD_FILE, EMBEDDINGS_FILE, INDEX_DIR = "library.json", "card.json", "embeddings.safetensors", "index"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def linear_shapes(model) -> dict[str, list[int]]:
    """{module name: [in_features, out_features]} of every nn.Linear a LoRA may adapt (not lm_head)."""
    return {name: [m.in_features, m.out_features] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}


def shapes_fingerprint(shapes: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    modules: dict[str, list[int]] = field(default_factory=dict, metadata={"help": "{module: [in, out, r]}"})
    rank: int = field(default=0, metadata={"help": "LoRA rank r"})
    target_modules: list[str] = field(default_factory=list, metadata={"help": "adapted module names"})
    source_task: str = field(default="", metadata={"help": "task the adapter was trained on"})
    metrics: dict = field(default_factory=dict, metadata={"help": "held-out accuracy of expert and base"})
    sha256: str = field(default="", metadata={"help": "sha256 of adapter_model.safetensors"})
    created: str = field(default="", metadata={"help": "creation time, ISO 8601 UTC"})
    lorahub_plus_version: str = field(default=__version__, metadata={"help": "version that wrote the card"})

    @classmethod
    def read(cls, path: Path) -> "Card":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise LibraryError(f"{path}: cannot read card ({e})") from e
        if not isinstance(raw, dict):
            raise LibraryError(f"{path}: a card must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        for key in ("name", "description"):
            if not isinstance(raw.get(key), str):
                raise LibraryError(f"{path}: field `{key}` must be a string, got {raw.get(key)!r}")
        for key, expected in (("keywords", list), ("metrics", dict), ("modules", dict), ("target_modules", list)):
            if key in raw and not isinstance(raw[key], expected):
                raise LibraryError(f"{path}: field `{key}` must be a {expected.__name__}, got {raw[key]!r}")
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


@dataclass
class Hit:
    name: str
    score: float
    card: Card


class Library:
    """A folder of experts. `Library(path)` opens one; `Library.create(path, model)` starts one."""

    def __init__(self, path: str | os.PathLike, embedder=None):
        self.path = Path(path)
        meta_file = self.path / LIBRARY_FILE
        if not meta_file.is_file():
            raise LibraryError(f"{self.path}: not a library (no `{LIBRARY_FILE}`); create one with `library init`")
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
            self.base_model, self.base_shapes = self.meta["base_model"], self.meta["modules"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LibraryError(f"{meta_file}: malformed ({e}); expected `base_model` and `modules`") from e
        self._embedder = embedder

    @classmethod
    def create(cls, path: str | os.PathLike, model, load_from: str | None = None, embedder_name: str | None = None,
               embedder=None) -> "Library":
        """Start an empty library for `model`; `load_from` is what load_base_model takes (None: the default)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if (path / LIBRARY_FILE).exists():
            raise LibraryError(f"{path}: a library already exists here")
        shapes = linear_shapes(model)
        meta = {"format": 1, "base_model": model.config._name_or_path, "load_from": load_from,
                "fingerprint": shapes_fingerprint(shapes), "embedder": embedder_name, "modules": shapes}
        atomic_write_text(path / LIBRARY_FILE, json.dumps(meta, indent=1) + "\n")
        return cls(path, embedder)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def embedder(self):
        if self._embedder is None:
            from .models import load_embedder

            self._embedder = load_embedder(self.meta.get("embedder"))
        return self._embedder

    def names(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()
                      if NAME.match(p.name) and p.name != INDEX_DIR and (p / CARD_FILE).is_file())

    def card(self, name: str) -> Card:
        path = self.path / name / CARD_FILE
        if not NAME.match(name) or not path.is_file():
            raise LibraryError(f"{self.path}: no expert named {name!r}")
        return Card.read(path)

    def cards(self) -> list[Card]:
        return [self.card(n) for n in self.names()]

    def expert_path(self, name: str) -> Path:
        self.card(name)
        return self.path / name

    def __len__(self) -> int:
        return len(self.names())

    # -- checking --------------------------------------------------------------------------------
    def check_compatible(self, shapes: dict[str, list[int]], source: str) -> None:
        """Refuse an adapter whose modules are missing from, or shaped unlike, the base model."""
        for module, (n_in, n_out, _) in shapes.items():
            if module not in self.base_shapes:
                raise IncompatibleAdapterError(
                    f"{source}: module `{module}` does not exist in the library's base model `{self.base_model}`")
            if self.base_shapes[module] != [n_in, n_out]:
                raise IncompatibleAdapterError(
                    f"{source}: module `{module}` is {n_in}->{n_out} in the adapter but "
                    f"{self.base_shapes[module][0]}->{self.base_shapes[module][1]} in `{self.base_model}`")
        if not shapes:
            raise IncompatibleAdapterError(f"{source}: the adapter holds no LoRA weights")

    def verify(self) -> list[str]:
        """Every problem found: checksums, shapes, config against card, index against experts."""
        problems = []
        for name in self.names():
            where = self.path / name
            try:
                card = self.card(name)
                config, weights = read_adapter(where)
                shapes = lora_shapes(weights, str(where / WEIGHTS_FILE))
                self.check_compatible(shapes, str(where))
                if sha256_file(where / WEIGHTS_FILE) != card.sha256:
                    problems.append(f"{where / WEIGHTS_FILE}: sha256 differs from card field `sha256`")
                if shapes != card.modules:
                    problems.append(f"{where / CARD_FILE}: field `modules` differs from the weights' shapes")
                if config.get("r") != card.rank:
                    problems.append(f"{where / CARD_FILE}: field `rank` {card.rank} != adapter_config r {config.get('r')}")
                if card.name != name:
                    problems.append(f"{where / CARD_FILE}: field `name` {card.name!r} != folder name {name!r}")
                if card.base_fingerprint != self.fingerprint:
                    problems.append(f"{where / CARD_FILE}: field `base_fingerprint` != library fingerprint")
            except (LibraryError, IncompatibleAdapterError) as e:
                problems.append(str(e))
        names_file = self.path / INDEX_DIR / "names.json"
        indexed = json.loads(names_file.read_text())["description"] if names_file.is_file() else []
        if indexed != self.names():
            problems.append(f"{names_file}: index lists {len(indexed)} experts, library holds {len(self)}; run reindex")
        return problems

    # -- writing ---------------------------------------------------------------------------------
    @contextmanager
    def _locked(self):
        with FileLock(str(self.path / ".lock"), timeout=600):
            yield

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(texts, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)

    def add(self, source: str | os.PathLike, name: str | None = None, description: str | None = None,
            keywords: list[str] | None = None, examples: list[str] | None = None,
            replace: bool = False) -> Card:
        """Copy a PEFT adapter folder (or hub id) into the library, with a card, and reindex.

        A card.json beside the adapter supplies what the arguments leave out; `examples` (input
        texts) give the expert an input centroid for example-based retrieval.
        """
        folder = resolve_adapter(source)
        config, weights = read_adapter(folder)
        shapes = lora_shapes(weights, str(folder / WEIGHTS_FILE))
        self.check_compatible(shapes, str(folder))
        given = Card.read(folder / CARD_FILE) if (folder / CARD_FILE).is_file() else None
        name = name or (given.name if given else folder.name)
        if not NAME.match(name) or name == INDEX_DIR:
            raise LibraryError(f"`name` must match {NAME.pattern} (letters, digits, _ . -), got {name!r}")
        description = description or (given.description if given else "")
        if not description:
            raise LibraryError(f"{folder}: no description (pass `description` or add a card.json)")
        card = Card(
            name=name, description=description,
            keywords=list(keywords if keywords is not None else (given.keywords if given else [])),
            base_model=config.get("base_model_name_or_path") or self.base_model,
            base_fingerprint=self.fingerprint, modules=shapes, rank=int(config.get("r", 0)),
            target_modules=sorted({m.rsplit(".", 1)[-1] for m in shapes}),
            source_task=given.source_task if given else "", metrics=given.metrics if given else {},
            sha256=sha256_file(folder / WEIGHTS_FILE),
            created=(given.created if given else "") or datetime.now(timezone.utc).isoformat(timespec="seconds"))
        vectors = {"description": torch.from_numpy(self._embed([card_text(card)])[0])}
        old = load_file(str(folder / EMBEDDINGS_FILE)) if (folder / EMBEDDINGS_FILE).is_file() else {}
        if examples:
            vectors["centroid"] = torch.from_numpy(self.centroid(examples))
        elif "centroid" in old:
            vectors["centroid"] = old["centroid"]
        with self._locked():
            dest = self.path / name
            if dest.exists() and not replace:
                raise LibraryError(f"{self.path}: an expert named {name!r} exists already (use replace)")
            with atomic_dir(dest, then=self._write_indexes) as tmp:
                for file in (CONFIG_FILE, WEIGHTS_FILE):
                    shutil.copy2(folder / file, tmp / file)
                save_file(vectors, str(tmp / EMBEDDINGS_FILE))
                (tmp / CARD_FILE).write_text(card.to_json(), encoding="utf-8")
        return card

    def remove(self, name: str) -> None:
        with self._locked(), set_aside(self.expert_path(name)):
            self._write_indexes()

    def reindex(self) -> None:
        """Re-embed every card's description (the embedder may have changed) and rebuild the indexes."""
        with self._locked():
            for name in self.names():
                file = self.path / name / EMBEDDINGS_FILE
                vectors = load_file(str(file)) if file.is_file() else {}
                vectors["description"] = torch.from_numpy(self._embed([card_text(self.card(name))])[0])
                with atomic_file(file) as tmp:
                    save_file(vectors, str(tmp))
            self._write_indexes()

    def _write_indexes(self) -> None:
        """Rebuild both indexes from the experts' stored vectors (no re-embedding); the index folder
        is replaced whole, so its files and names.json always agree."""
        names, rows = {"description": [], "centroid": []}, {"description": [], "centroid": []}
        for name in self.names():
            file = self.path / name / EMBEDDINGS_FILE
            vectors = load_file(str(file)) if file.is_file() else {}
            for kind in rows:
                if kind in vectors:
                    names[kind].append(name)
                    rows[kind].append(vectors[kind].numpy())
        with atomic_dir(self.path / INDEX_DIR) as tmp:
            for kind, vecs in rows.items():
                empty = lambda: np.zeros((0, self.embedder.get_embedding_dimension()), np.float32)  # noqa: E731
                write_index(build_index(np.stack(vecs) if vecs else empty()), tmp / f"{kind}.faiss")
            (tmp / "names.json").write_text(json.dumps(names, indent=1) + "\n")

    # -- searching -------------------------------------------------------------------------------
    def centroid(self, texts: list[str]) -> np.ndarray:
        """Unit mean of the texts' unit embeddings: where an expert's inputs live."""
        mean = self._embed(list(texts)).mean(0)
        return mean / max(np.linalg.norm(mean), 1e-12)

    def _search(self, kind: str, query: np.ndarray, k: int) -> list[Hit]:
        index_dir = self.path / INDEX_DIR
        if not (index_dir / "names.json").is_file():
            raise LibraryError(f"{self.path}: no index yet; run `lorahub-plus library reindex`")
        with self._locked():  # the index and its names change together under the lock
            names = json.loads((index_dir / "names.json").read_text())[kind]
            index = read_index(index_dir / f"{kind}.faiss")
        scores, ids = search_index(index, query[None], k)
        return [Hit(names[i], float(s), self.card(names[i])) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def search(self, description: str, k: int = 5) -> list[Hit]:
        """Experts whose cards are closest to a task description (cosine similarity)."""
        return self._search("description", self._embed([description])[0], k)

    def search_by_examples(self, inputs: list[str], k: int = 5) -> list[Hit]:
        """Experts whose training inputs lie closest to these inputs (centroid cosine similarity)."""
        return self._search("centroid", self.centroid(inputs), k)
