"""A learned gate, in the spirit of X-LoRA (Buehler & Buehler 2024) but in one pass: in every routed layer a
linear map reads the hidden state that enters the layer and gives K logits; the top-k go through a softmax.
It reads only the current token's state, so generation keeps the KV cache and needs no second forward
(peft's XLoraModel runs the model twice per step with the cache off).

Trained with the experts and the base model frozen, on a mix of the library tasks' training splits (the
cards' splits, never their held-out examples), loss on answer tokens. Saved in the library as
`gate/gate.safetensors` + `gate/gate.json` (the experts it routes to, the base model's fingerprint, its
training settings and losses); loading checks both against the library.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lorahub_plus.version import __version__
from lorahub_plus.encode import Encoded, encode_examples
from lorahub_plus.errors import LibraryError
from lorahub_plus.library.store import Library
from lorahub_plus.paths import resolve_task
from lorahub_plus.library.readers import check_field, check_number, check_whole, read_json, read_safetensors
from lorahub_plus.models import frozen
from lorahub_plus.routed import RoutedModel, top_k
from lorahub_plus.tasks import load_task, split_examples
from lorahub_plus.library.train import fit_answers
from lorahub_plus.plots import plot_losses

GATE_DIR, GATE_WEIGHTS, GATE_CONFIG = "gate", "gate.safetensors", "gate.json"
GATE_LOSS_TITLE = "gate training (loss on answer tokens)"
logger = logging.getLogger(__name__)


@dataclass
class GateConfig:
    k: int = field(default=3, metadata={"help": "experts kept per token and layer"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature over the kept logits"})
    per_task: int = field(default=32, metadata={"help": "training examples drawn from each library task"})
    epochs: int = field(default=1, metadata={"help": "passes over the training mix"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate (10% warm-up, linear decay)"})
    max_length: int = field(default=256, metadata={"help": "tokens per training sequence"})
    seed: int = field(default=0, metadata={"help": "seed of the draw, the order and the init"})

    def __post_init__(self):
        for name in ("k", "per_task", "epochs", "batch_size", "max_length"):
            check_whole(name, getattr(self, name))
        check_number("temperature", self.temperature)
        check_number("lr", self.lr)


class GateRouter(nn.Module):
    """One linear gate per routed layer: logits (B, T, K) from the layer's input, top-k softmax."""

    per_token = True

    def __init__(self, in_features: list[int], n_experts: int, k: int = 3, temperature: float = 1.0, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():  # small random logits: zero ones would tie, and top-k would pick the same experts
            torch.manual_seed(seed)
            self.gates = nn.ModuleList(_Gate(n, n_experts, k, temperature) for n in in_features)
            for gate in self.gates:
                nn.init.normal_(gate.weight, std=1e-3)
                nn.init.zeros_(gate.bias)

    def layer(self, index: int) -> nn.Module:
        return self.gates[index]

    @property
    def k(self) -> int:
        return self.gates[0].k


class _Gate(nn.Linear):
    """One routed layer's gate: logits (B, T, K) from the layer's input, top-k softmax."""

    def __init__(self, in_features: int, n_experts: int, k: int, temperature: float):
        super().__init__(in_features, n_experts)
        self.k, self.temperature = k, temperature

    def forward(self, x: torch.Tensor):
        return top_k(super().forward(x.to(self.weight.dtype)), self.k, self.temperature)


def training_mix(library: Library, names: list[str], cfg: GateConfig) -> list[tuple]:
    """(task, example) pairs: up to `per_task` from each expert's training split (its card's split). An expert
    whose card names no source task and split (one added from elsewhere) gives no examples; the gate still
    routes to it."""
    rng, mix = random.Random(cfg.seed), []
    for name in names:
        card = library.card(name)
        if not card.source_task or not {"n_test", "split_seed"} <= set(card.metrics):
            logger.warning("%s: no source task or split on its card: no gate training examples from it", name)
            continue
        task = load_task(resolve_task(card.source_task))
        train = split_examples(task.examples, card.metrics["n_test"], card.metrics["split_seed"])[0]
        mix += [(task, ex) for ex in rng.sample(train, min(cfg.per_task, len(train)))]
    if not mix:
        raise LibraryError(f"{library.path}: no expert's card names a source task and split; nothing to train "
                           "the gate on")
    rng.shuffle(mix)
    return mix


def train_gate(routed: RoutedModel, tokenizer, encoded: list[Encoded], cfg: GateConfig, progress: bool = True
               ) -> list[float]:
    """Fit `routed.router` (a GateRouter) on encoded sequences (`encode_examples`); everything else stays frozen.
    Returns the loss per step."""
    parameters = list(routed.router.parameters())  # inside the model too: each layer holds its gate
    with frozen(routed.model, train=parameters), torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return fit_answers(routed, encoded, parameters, cfg.epochs, cfg.batch_size, cfg.lr,
                           tokenizer.pad_token_id, "training gate", progress)


def save_gate(library: Library, gate: GateRouter, names: list[str], cfg: GateConfig, losses: list[float],
              seconds: float) -> Path:
    """library/gate/, replaced whole (under the library's lock)."""
    meta = {"experts": names, "base_model": library.base_model, "fingerprint": library.fingerprint,
            "in_features": [g.in_features for g in gate.gates], "config": asdict(cfg), "train_seconds": round(seconds, 1),
            "losses": losses, "lorahub_plus_version": __version__}
    with library.artefact(GATE_DIR) as tmp:
        save_file({k: v.detach().contiguous() for k, v in gate.state_dict().items()}, str(tmp / GATE_WEIGHTS))
        (tmp / GATE_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        plot_losses({GATE_LOSS_TITLE: losses}, tmp / "loss.png")
    return library.path / GATE_DIR


def load_gate(library: Library, in_features: list[int] | None = None) -> tuple[GateRouter, list[str]]:
    """The library's trained gate and the experts it routes to; refused if the library or base model changed,
    or (given the routed modules' `in_features`, in order) if it gates other modules."""
    folder = library.path / GATE_DIR
    if not (folder / GATE_CONFIG).is_file():
        raise LibraryError(f"{folder}: no trained gate; build one with `lorahub-plus gate train`")
    meta = read_json(folder / GATE_CONFIG)
    where = str(folder / GATE_CONFIG)
    names = check_field(meta.get("experts"), list, where, "experts", LibraryError, item=str)
    gated = check_field(meta.get("in_features"), list, where, "in_features", LibraryError, item=int)
    if in_features is not None and gated != list(in_features):
        raise LibraryError(f"{where}: field `in_features` ({len(gated)} gates) does not match the {len(in_features)} "
                           "modules the experts adapt; retrain the gate")
    if meta.get("fingerprint") != library.fingerprint:
        raise LibraryError(f"{where}: trained for another base model (field `fingerprint`); retrain the gate")
    if names != library.names():
        missing, extra = sorted(set(names) - set(library.names())), sorted(set(library.names()) - set(names))
        raise LibraryError(f"{where}: trained for another set of experts (field `experts`: the library lacks "
                           f"{missing}, and has {extra} that the gate does not know); retrain the gate")
    try:
        cfg = GateConfig(**check_field(meta.get("config"), dict, where, "config", LibraryError))
    except (TypeError, ValueError) as e:
        raise LibraryError(f"{where}: field `config` is not a gate config ({e})") from e
    gate = GateRouter(gated, len(names), cfg.k, cfg.temperature)
    state = read_safetensors(folder / GATE_WEIGHTS)
    expected = {k: v.shape for k, v in gate.state_dict().items()}
    if {k: v.shape for k, v in state.items()} != expected:
        raise LibraryError(f"{folder / GATE_WEIGHTS}: tensors do not match {GATE_CONFIG} (expected {len(expected)} "
                           f"gate tensors for {len(names)} experts)")
    gate.load_state_dict(state)
    return gate, names


def build_gate(library: Library, model, tokenizer, cfg: GateConfig | None = None, progress: bool = True) -> Path:
    """Train a gate over every expert of the library and save it there: the command behind `gate train`."""
    from lorahub_plus.library.stack import load_stack

    cfg = cfg or GateConfig()
    names = library.names()
    stack = load_stack(library, names)
    gate = GateRouter([A.shape[2] for A, _ in stack.modules.values()], len(names), cfg.k, cfg.temperature, cfg.seed)
    routed = RoutedModel(model, stack.modules, "mixture", router=gate)
    start = time.perf_counter()
    try:
        losses = train_gate(routed, tokenizer, encode_examples(tokenizer, training_mix(library, names, cfg), cfg.max_length),
                            cfg, progress)
    finally:
        routed.remove()
    return save_gate(library, gate, names, cfg, losses, time.perf_counter() - start)
