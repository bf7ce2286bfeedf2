"""The front door: one library and, loaded on first use, its base model. The CLI, the notebooks and the server
all go through it.

    from lorahub_plus import Hub
    hub = Hub("library")                         # the default library and model when left out
    hub.search("add two numbers")                # [Hit(name, score, card), ...]
    hub.generate(["What is 47 plus 38?"])         # routed per input: ["85"]
    hub.compose("few.jsonl", out="composed")      # a PEFT adapter from a few examples (or no adapter)
    hub.synthesize("Add two numbers.", out="synth")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorahub_plus.compose.composer import Composition
    from lorahub_plus.library.store import Card, Hit
    from lorahub_plus.routing.routers import Router
    from lorahub_plus.tasks import Task


class Hub:
    """`library`: a folder (default: the committed library); `base_model`: a hub id or folder (default: the one
    the library was built with, else the embedded SmolLM2-135M-Instruct)."""

    def __init__(self, library: str | os.PathLike | None = None, base_model: str | None = None):
        from lorahub_plus.library.store import Library
        from lorahub_plus.paths import default_library

        self.library = Library(library or default_library())
        self._base_model = base_model or self.library.meta.get("load_from")
        self._loaded = None
        self._routers: dict[str, Router] = {}

    @property
    def model(self):
        return self._load()[0]

    @property
    def tokenizer(self):
        return self._load()[1]

    def _load(self):
        if self._loaded is None:
            from lorahub_plus.models import load_base_model

            self._loaded = load_base_model(self._base_model)
        return self._loaded

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """Experts whose cards read closest to `query`, best first."""
        return self.library.search(query, k)

    def router(self, name: str = "retrieval", **options) -> Router:
        """The library's router of that name (`RouterConfig` options), built once and kept."""
        from lorahub_plus.routing.routers import Router, RouterConfig

        key = repr((name, sorted(options.items())))
        if key not in self._routers:
            for other in list(self._routers):  # one router holds the model at a time
                self._routers.pop(other).remove()
            self._routers[key] = Router(self.library, self.model, self.tokenizer, RouterConfig(router=name, **options))
        return self._routers[key]

    def generate(self, inputs: list[str], adapters: list[str | None] | None = None, router: str = "retrieval",
                 max_new_tokens: int = 64, **options) -> list[str]:
        """Answers to plain inputs (asked in the chat template), each routed on its own or as `adapters` names
        it: an expert, `auto`, `none` (the base model) or a composed mixture's folder."""
        return self.router(router, **options).generate(inputs, max_new_tokens, adapters=adapters)

    def explain(self, inputs: list[str], router: str = "retrieval", **options) -> list[list[tuple[str, float]]]:
        """Per input, the experts the router gives it and their weights."""
        return self.router(router, **options).explain(inputs)

    def compose(self, examples: str | os.PathLike | Task | list[tuple[str, str]], description: str | None = None,
                out: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = False,
                names: list[str] | None = None, **options) -> Composition:
        """Fit library experts (retrieved, or the `names` given) to a few examples (a task file, a Task, or
        (input, target) pairs; `ComposeConfig` options). `result.base_won`: no expert beat the base model, and no
        adapter was written."""
        from lorahub_plus.compose.config import ComposeConfig
        from lorahub_plus.compose.composer import compose
        from lorahub_plus.library.atomic import check_output_dir
        from lorahub_plus.tasks import Example, Task, load_task

        cfg = ComposeConfig(**options)  # options and the output folder checked before the model loads
        if out is not None:
            check_output_dir(Path(out), overwrite)
        if isinstance(examples, (str, os.PathLike)):
            task = load_task(examples)
        elif isinstance(examples, Task):
            task = examples
        else:
            task = Task("examples", [Example(i, t) for i, t in examples], plain=True)
        self._release()
        return compose(self.model, self.tokenizer, task, self.library, cfg,
                       description=description, names=names, out=out, overwrite=overwrite, progress=progress)[0]

    def synthesize(self, description: str | None = None, examples: list[tuple[str, str]] | None = None,
                   out: str | os.PathLike | None = None, name: str | None = None, **options) -> Card:
        """An adapter from the library's hypernetwork, written to `out` and/or added to the library as `name`."""
        from lorahub_plus.hypernet.synthesize import synthesize

        return synthesize(description, examples, out, self.library, name, **options)

    def add(self, source: str | os.PathLike, **options) -> Card:
        """Add a PEFT adapter folder or hub id to the library (`Library.add` options); routers see it next call."""
        self._release()
        return self.library.add(source, **options)

    def _release(self) -> None:
        """Give the model back from any router (compose wraps it afresh)."""
        for key in list(self._routers):
            self._routers.pop(key).remove()

    def close(self) -> None:
        self._release()

