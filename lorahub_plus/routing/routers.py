"""Routers, by name: how each input, or each token, picks its experts from a library.

- retrieval (LoraRetriever, Zhao et al. 2024): embed each input, take its top-k experts from the
  example-centroid index (description index for experts without a centroid), weight them by a
  softmax of the similarities over `temperature`. One row of weights per input; no training. Its
  default k is 1: on held-out inputs of the library's tasks, and on unseen dev tasks, the closest
  expert alone beat a mix of the closest three (benchmarks/route_bench.md).
- arrow (Ostapenko et al. 2024; peft's ArrowConfig): per token and per layer, the coefficient of an
  expert is |<x, prototype>|, its prototype the top right singular vector of B·A; the top-k
  coefficients go through a softmax over `temperature`. No training.
- gate (`gate.py`): a learned linear gate per layer, per token, in one pass with the KV cache.

`Router` is the facade: built from a library, it routes, generates and explains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from lorahub_plus.library.store import Library
from lorahub_plus.hypernet.network import load_hypernet, task_vectors
from lorahub_plus.library.readers import check_number, check_whole
from lorahub_plus.routed import RoutedModel, Rows, check_bare, top_k, top_k_softmax
from lorahub_plus.library.stack import load_stack
from lorahub_plus.hypernet.synthesize import SYNTHESIZED, fallback_threshold

ROUTERS: dict[str, type] = {}


def register_router(name: str, k: int | None):
    """`k`: the router's default experts per input or token (None: its own, a trained gate's). A per-token
    router is an nn.Module whose `layer(index)` gives the routed layer `index` its share: a module mapping that
    layer's input to expert weights."""
    def wrap(cls):
        if name in ROUTERS:
            raise ValueError(f"router `{name}` is already registered")
        ROUTERS[name], cls.name, cls.default_k = cls, name, k
        return cls
    return wrap


@dataclass
class RouterConfig:
    router: str = field(default="retrieval", metadata={"help": "a registered router (ROUTERS)"})
    k: int | None = field(default=None, metadata={
        "help": "experts per input (retrieval; default 1) or per token and layer (arrow; default 3); the gate "
                "keeps its trained k"})
    temperature: float = field(default=0.1, metadata={"help": "softmax temperature over the top-k scores"})
    fallback: str = field(default="auto", metadata={
        "help": "synthesize an adapter for an input no expert is close to: auto (below the hypernetwork's "
                "calibrated route threshold), never, or always"})

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"`router` must be one of {sorted(ROUTERS)}, got {self.router!r}")
        if self.k is not None and ROUTERS[self.router].default_k is None:
            raise ValueError(f"router `{self.router}` keeps its trained k; do not pass `k`")
        if self.k is not None:
            check_whole("k", self.k)
        check_number("temperature", self.temperature)
        if self.fallback not in ("auto", "never", "always"):
            raise ValueError(f"`fallback` must be 'auto', 'never' or 'always', got {self.fallback!r}")

    @property
    def top_k(self) -> int | None:
        """`k`, or the router's default when none was given: read at use, so `replace(cfg, router=...)` takes the
        new router's default (None: the gate's trained k)."""
        return ROUTERS[self.router].default_k if self.k is None else self.k


@register_router("retrieval", k=1)
class RetrievalRouter:
    """Per input: the top-k experts whose training inputs (or description) lie closest to it."""

    per_token = False

    def __init__(self, library: Library, names: list[str], stack_modules, cfg: RouterConfig):
        self.library, self.names, self.cfg = library, names, cfg

    def similarities(self, inputs: list[str]) -> torch.Tensor:
        """(B, K) cosine of each input with each expert's input centroid (`Library.similarities`)."""
        return torch.from_numpy(self.library.similarities(inputs, self.names)).float()

    def routes(self, inputs: list[str], similarities: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) weights, one row per input."""
        sims = self.similarities(inputs) if similarities is None else similarities
        return top_k_softmax(sims, self.cfg.top_k, self.cfg.temperature)

    def plain_routes(self, inputs: list[str], similarities: torch.Tensor | None = None) -> torch.Tensor:
        """`routes` for inputs asked in the chat template, as a person types them: only to experts that learned
        that framing (trained with `--chat`; an adapter from elsewhere counts as one) and close to the input (its
        cosine at least the library's calibrated `close`); a row with none is zeros, the base model. An expert
        trained on a task's framing alone answers a chat question in that framing (a spider's legs as a
        remainder modulo 7), where the base model answers it."""
        sims = self.similarities(inputs) if similarities is None else similarities
        chat, close = self._chat_experts
        sims = sims.masked_fill(~chat, -2.0)  # below any cosine
        w = top_k_softmax(sims, self.cfg.top_k, self.cfg.temperature) * chat
        return w * (sims.max(-1).values >= (-1.0 if close is None else close))[:, None]

    @cached_property
    def _chat_experts(self) -> tuple[torch.Tensor, float | None]:
        """(K,) which experts learned the chat framing, and the library's `close` (None: not calibrated)."""
        return (torch.tensor([_learned_chat(self.library.card(n)) for n in self.names]),
                (self.library.calibration("close") or {}).get("value"))


def _learned_chat(card) -> bool:
    """Whether an expert was trained on inputs asked in the chat template: ours record it (`chat`), an adapter
    added from elsewhere is taken to have been."""
    config = card.metrics.get("train_config")
    return config is None or config.get("chat", "off") != "off"


@register_router("gate", k=None)
def _learned_gate(library: Library, names: list[str], stack_modules, cfg: RouterConfig):
    """The library's trained gate (`lorahub-plus gate train`); k and temperature are the trained ones."""
    from lorahub_plus.routing.gate import load_gate

    gate, trained = load_gate(library, [A.shape[-1] for A, _ in stack_modules.values()])
    if names != trained:
        raise ValueError("the gate routes over every expert of the library; `names` must be all of them")
    return gate


@register_router("arrow", k=3)
class ArrowRouter(nn.Module):
    """Per token and layer: |<x, prototype_k>|, the top-k of them through a softmax."""

    per_token = True

    def __init__(self, library: Library, names: list[str], stack_modules, cfg: RouterConfig):
        super().__init__()
        self.layers = nn.ModuleList(_ArrowLayer(arrow_prototypes(A, B), cfg) for A, B in stack_modules.values())

    def layer(self, index: int) -> nn.Module:
        return self.layers[index]


class _ArrowLayer(nn.Module):
    """One routed layer's prototypes (K, in)."""

    def __init__(self, prototypes: torch.Tensor, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("prototypes", prototypes)

    def forward(self, x: torch.Tensor):
        scores = (x @ self.prototypes.to(x.dtype).T).abs()  # (B, T, K)
        return top_k(scores, self.cfg.top_k, self.cfg.temperature)


def arrow_prototypes(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(K, in): each expert's top right singular vector of B_k A_k, from its thin factors (no (out, in) product).

    A_k^T = Q R, so B_k A_k = (B_k R^T) Q^T; the SVD of the small (out, r) matrix B_k R^T gives V, and Q V[:, 0]
    is the top right singular vector (its sign does not matter: the router takes |<x, p>|). An expert that does
    not adapt the module (all zeros in a heterogeneous stack) gets a zero prototype: it never scores there.
    """
    Q, R = torch.linalg.qr(A.float().transpose(1, 2))  # (K, in, r), (K, r, r)
    _, S, Vh = torch.linalg.svd(B.float() @ R.transpose(1, 2), full_matrices=False)  # Vh: (K, r, r)
    return ((Q @ Vh[:, 0, :, None]).squeeze(-1) * (S[:, :1] > 0)).to(A.dtype)


@torch.no_grad()
def mean_token_weights(routed: RoutedModel, tokenizer, text: str) -> torch.Tensor:
    """(K,) a per-token router's weights on `text`, averaged over its tokens and every routed layer (the last
    tokens that fit the context, as `generate` keeps them)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][-routed.config.max_position_embeddings:]
    return routed.module_weights(input_ids=torch.tensor([ids], device=routed.device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=routed.device)).mean(0)


class Router:
    """Route inputs from a library to its experts: `generate(inputs)` and `explain(inputs)`.

    Inputs are what routing reads (the request itself); `generate` continues `prompts`, the inputs as
    the model should see them (a task's whole prompt, say), or the inputs themselves. An input that no
    expert is close to (best retrieval score under the hypernetwork's calibrated route threshold) gets an
    adapter synthesized from it instead (`RouterConfig.fallback`).
    """

    def __init__(self, library: Library, model, tokenizer, cfg: RouterConfig | None = None,
                 names: list[str] | None = None):
        self.cfg = cfg or RouterConfig()
        self.library, self.tokenizer = library, tokenizer
        self.names = names or library.names()
        if not self.names:
            raise ValueError(f"{library.path}: no experts to route to")
        check_bare(model)  # before the stack and the router are built
        stack = load_stack(library, self.names)
        self.impl = ROUTERS[self.cfg.router](library, self.names, stack.modules, self.cfg)
        self.model = RoutedModel(model, stack.modules, "mixture",
                                 router=self.impl if self.impl.per_token else None)
        self.threshold = {"never": None, "always": float("inf")}.get(self.cfg.fallback) \
            if self.cfg.fallback != "auto" else fallback_threshold(library, "route")
        self._retrieval = self.impl if isinstance(self.impl, RetrievalRouter) else \
            RetrievalRouter(library, self.names, stack.modules, self.cfg) if self.threshold is not None else None
        self._hypernet = None  # loaded on the first input that falls back

    def rows(self, inputs: list[str], adapters: list[str | None] | None = None, chat: bool = False) -> Rows | None:
        """The call's `Rows` for a mixed batch, as S-LoRA and LoRAX serve one: each row names an expert, a
        composed adapter (a `compose --merge mixture` output folder: its report's weights over library
        experts), `auto` or None (the router, or the fallback) or `none` (the base model). None: every row
        follows a per-token router inside the forward. `chat`: the inputs are asked in the chat template
        (retrieval then routes as `RetrievalRouter.plain_routes` says)."""
        inputs = _check_inputs(inputs)
        if adapters is not None and (isinstance(adapters, str) or len(adapters) != len(inputs)):
            raise ValueError(f"`adapters` must be a list with one entry per input ({len(inputs)})")
        specs = adapters or [None] * len(inputs)
        far, routed = self._route(inputs, specs, chat)
        if adapters is None and not far.any():
            return None if routed is None else Rows(routed)
        weights, auto = torch.zeros(len(inputs), len(self.names)), torch.zeros(len(inputs), dtype=torch.bool)
        for row, spec in enumerate(specs):
            if far[row] or spec == "none":
                continue
            if spec in (None, "auto"):
                if routed is None:
                    auto[row] = True
                else:
                    weights[row] = routed[row]
            elif spec in self.names:
                weights[row, self.names.index(spec)] = 1.0
            else:
                weights[row] = self._composed(spec)
        return Rows(weights, auto if auto.any() else None, self._synthesized(inputs, far) if far.any() else None)

    def _route(self, inputs: list[str], specs: list, chat: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(far (B,) bool: router rows that fall back to a synthesized adapter, the per-input router's (B, K)
        weights or None for a per-token router), from one embedding of the inputs."""
        sims = self._retrieval.similarities(inputs) if self._retrieval is not None else None
        far = torch.zeros(len(inputs), dtype=torch.bool) if self.threshold is None else \
            (sims.max(-1).values < self.threshold) & torch.tensor([s in (None, "auto") for s in specs])
        if self.impl.per_token:
            return far, None
        return far, (self.impl.plain_routes if chat else self.impl.routes)(inputs, sims)

    @torch.no_grad()
    def _synthesized(self, inputs: list[str], far: torch.Tensor) -> dict:
        """{module: (A (B, r, in), B (B, out, r))}: an adapter generated from each far input (the
        hypernetwork's example half: the input with no target), zeros for the other rows; one embedding call
        and one hypernetwork forward for all of them."""
        self._hypernet = self._hypernet or load_hypernet(self.library)
        rows = far.nonzero().flatten()
        lora = self._hypernet[0].eval()(task_vectors(
            self.library.embedder, [(None, [(inputs[r], "")]) for r in rows.tolist()]))
        return {m: (A.new_zeros(len(inputs), *A.shape[1:]).index_copy(0, rows, A),
                    B.new_zeros(len(inputs), *B.shape[1:]).index_copy(0, rows, B)) for m, (A, B) in lora.items()}

    def _composed(self, folder: str) -> torch.Tensor:
        from pathlib import Path

        from lorahub_plus.errors import LibraryError
        from lorahub_plus.library.readers import check_field, read_json

        path = Path(folder) / "report.json"
        if not path.is_file():
            raise ValueError(f"`adapters`: {folder!r} is neither an expert of {self.library.path}, `auto`, `none`, "
                             "nor a composed adapter folder (with report.json)")
        report = read_json(path)
        names = check_field(report.get("names"), list, str(path), "names", LibraryError, item=str)
        weights = check_field(report.get("weights"), list, str(path), "weights", LibraryError, item=(int, float))
        if (report.get("config") or {}).get("merge") != "mixture" or len(weights) != len(names):
            raise LibraryError(f"{path}: only a `mixture` composition with one weight per expert is a mix of the "
                               "library's experts; load other adapters with peft")
        unknown = sorted(set(names) - set(self.names))
        if unknown:
            raise LibraryError(f"{path}: field `names` lists experts this router does not hold: {unknown}")
        row = torch.zeros(len(self.names))
        for name, weight in zip(names, weights):
            row[self.names.index(name)] = weight
        return row

    @torch.no_grad()
    def explain(self, inputs: list[str], chat: bool | None = None) -> list[list[tuple[str, float]]]:
        """Per input, the experts it uses and their weights, largest first (per-token routers: the mean weight
        over the input's tokens and all layers; a fallback: `synthesized`, 1.0; none: the base model). `chat`:
        routed as inputs asked in the chat template (`rows`); None: as `generate(inputs)` asks them."""
        from lorahub_plus.prompts import chat_frame

        chat = chat_frame(self.tokenizer) is not None if chat is None else chat
        far, routed = self._route(_check_inputs(inputs), [None] * len(inputs), chat)
        out = []
        for row, text in enumerate(inputs):
            if far[row]:
                out.append([(SYNTHESIZED, 1.0)])
                continue
            w = routed[row] if routed is not None else mean_token_weights(self.model, self.tokenizer, text)
            out.append([(self.names[i], float(w[i])) for i in w.argsort(descending=True) if w[i] > 0])
        return out

    @torch.no_grad()
    def generate(self, inputs: list[str], max_new_tokens: int = 64, prompts: list[str] | None = None,
                 adapters: list[str | None] | None = None) -> list[str]:
        """Greedy answers, each input routed on its own (or as `adapters` names, see `rows`), in one batched
        generate. Inputs are asked in the model's chat template (`prompts.chat_prompt`) and answered up to the
        end of the turn; `prompts` given instead (a task's framing) are answered up to the first newline. A
        prompt longer than the context loses its start."""
        from lorahub_plus.prompts import chat_frame, chat_prompt

        inputs = _check_inputs(inputs)
        chat = prompts is None and chat_frame(self.tokenizer) is not None
        prompts = _check_inputs(prompts if prompts is not None else [chat_prompt(self.tokenizer, x) for x in inputs])
        if len(prompts) != len(inputs):
            raise ValueError(f"{len(prompts)} `prompts` for {len(inputs)} `inputs`: one each")
        room = self.model.config.max_position_embeddings - max_new_tokens  # a longer prompt is cut from the left
        if room < 1:
            raise ValueError(f"`max_new_tokens` ({max_new_tokens}) leaves no room in the model's context "
                             f"({self.model.config.max_position_embeddings} tokens)")
        side = self.tokenizer.padding_side, self.tokenizer.truncation_side
        self.tokenizer.padding_side = self.tokenizer.truncation_side = "left"
        try:
            batch = self.tokenizer([t.rstrip(" ") for t in prompts], return_tensors="pt", padding=True,
                                   truncation=True, max_length=room, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side, self.tokenizer.truncation_side = side
        batch = batch.to(self.model.device)
        out = self.model.generate(**batch, routes=self.rows(inputs, adapters, chat), max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() if chat else t.strip().split("\n")[0] for t in texts]

    def remove(self):
        """Give the base model back."""
        return self.model.remove()


def _check_inputs(inputs: list[str]) -> list[str]:
    if isinstance(inputs, str) or not inputs or not all(isinstance(x, str) and x.strip() for x in inputs):
        raise ValueError("`inputs` must be a non-empty list of non-empty texts")
    return list(inputs)


