"""Every evaluation method, registered by name: the model as it is, ICL, an adapter, composition, routing,
synthesis and training."""
from __future__ import annotations

from dataclasses import replace

import torch

from lorahub_plus.compose.composer import compose
from lorahub_plus.compose.config import ComposeConfig, Variant
from lorahub_plus.evaluation.registry import METHODS, Prepared, register_method
from lorahub_plus.library.adapters import attach_adapter
from lorahub_plus.hypernet.synthesize import generate_lora
from lorahub_plus.library.store import Library
from lorahub_plus.library.train import MULTITASK, TrainConfig, train_lora
from lorahub_plus.paths import default_library
from lorahub_plus.routed import ConstantRouter, RoutedModel
from lorahub_plus.routing.routers import Router, RouterConfig
from lorahub_plus.tasks import Example, Task


@register_method("zero-shot", shots=False)
def _zero_shot(model, tokenizer, task, train, cfg):
    yield model, []


@register_method("icl")
def _icl(model, tokenizer, task, train, cfg):
    yield model, train[: cfg.shots]


@register_method("adapter", shots=False)
def _adapter(model, tokenizer, task, train, cfg, adapter=None):
    if adapter is None:
        raise ValueError("method `adapter` needs `adapter` (a PEFT adapter folder or hub id)")
    peft_model = attach_adapter(model, adapter)
    try:
        yield peft_model, []
    finally:
        peft_model.unload()


def _few_shot_task(task: Task, train: list[Example], shots: int) -> Task:
    return replace(task, examples=train[:shots])


def _composed(model, tokenizer, task, train, cfg, library, compose_cfg: ComposeConfig, exclude, use_description=True,
              variant: Variant | None = None):
    few = _few_shot_task(task, train, cfg.shots)
    result, routed = compose(model, tokenizer, few, library, compose_cfg, exclude=exclude or (),
                             description=task.description if use_description else None, keep=True, variant=variant)
    notes = {"base_test": result.base_test, "base_won": result.base_won,
             "best_score": result.fallback.get("best_score")}
    try:  # when the base model won, every weight is 0: the plain model scores the same, without the LoRA work
        yield Prepared(model if result.base_won else routed, [], notes=notes)
    finally:
        routed.remove()


@register_method("lorahub")
def _lorahub_method(model, tokenizer, task, train, cfg, library=None, exclude=None):
    """Faithful LoraHub: 20 random candidates, NGOpt, budget 40, (sum wB)(sum wA), no base candidate."""
    yield from _composed(model, tokenizer, task, train, cfg, library, ComposeConfig(
        optimizer="ngopt", merge="lorahub", include_base=False, seed=cfg.method_seed), exclude, use_description=False,
        variant=Variant(candidates="random", objective="tokens"))


@register_method("compose")
def _compose_method(model, tokenizer, task, train, cfg, library=None, compose_cfg=None, exclude=None, variant=None):
    """ComposeConfig's defaults (or `compose_cfg`): candidates retrieved by description and examples; `variant`
    (a benchmark's `Variant`) defaults to the measured choices."""
    yield from _composed(model, tokenizer, task, train, cfg, library, compose_cfg or ComposeConfig(seed=cfg.method_seed),
                         exclude, variant=variant)


@register_method("uniform")
def _uniform_method(model, tokenizer, task, train, cfg, library=None, exclude=None):
    yield from _composed(model, tokenizer, task, train, cfg, library,
                         ComposeConfig(optimizer="uniform", include_base=False, seed=cfg.method_seed), exclude)


@register_method("best-single")
def _best_single_method(model, tokenizer, task, train, cfg, library=None, exclude=None):
    """The retrieved candidate with the lowest few-shot answer-token loss (the default until issue 10)."""
    yield from _composed(model, tokenizer, task, train, cfg, library, ComposeConfig(
        optimizer="best-single", include_base=False, seed=cfg.method_seed), exclude,
        variant=Variant(objective="tokens"))


def _routed_method(model, tokenizer, task, library, router: str, fallback: str):
    """Every test example routed on its own input; the task's name and description are never used."""
    if library is None:
        raise ValueError(f"method `route-{router}` needs `library`")
    routing = Router(library, model, tokenizer, RouterConfig(router=router, fallback=fallback))
    try:
        yield Prepared(routing.model, [], lambda test: routing.rows([task.routing_text(ex) for ex in test]))
    finally:
        routing.remove()


def _register_route_method(router: str) -> None:
    def method(model, tokenizer, task, train, cfg, library=None, fallback="auto"):
        yield from _routed_method(model, tokenizer, task, library, router, fallback)

    register_method(f"route-{router}", shots=False)(method)


for _name in ("retrieval", "arrow", "gate"):
    _register_route_method(_name)


def _synthesized_model(model, library, description, examples):
    library = library if isinstance(library, Library) else Library(library or default_library())
    lora = generate_lora(library, description, examples)
    routed = RoutedModel(model, {m: (A[None], B[None]) for m, (A, B) in lora.items()}, "mixture",
                         router=ConstantRouter(torch.ones(1)))
    try:
        yield routed, []
    finally:
        routed.remove()


@register_method("hypernet", shots=False)
def _hypernet_method(model, tokenizer, task, train, cfg, library=None, description=None):
    """The library's hypernetwork, given a description only (the task's, unless `description`): zero-shot."""
    yield from _synthesized_model(model, library, description or task.description or task.name, None)


@register_method("hypernet-fewshot")
def _hypernet_fewshot_method(model, tokenizer, task, train, cfg, library=None):
    """The library's hypernetwork, given the task's shots (input and target) only."""
    if cfg.shots < 1:
        raise ValueError("method `hypernet-fewshot` is conditioned on the shots: give `shots` >= 1")
    yield from _synthesized_model(model, library, None, [(ex.input, ex.target) for ex in train[: cfg.shots]])


@register_method("multitask", shots=False)
def _multitask_method(model, tokenizer, task, train, cfg, library=None):
    """The library's `multitask` expert (one LoRA trained on the hypernetwork's training tasks, mixed)."""
    library = library if isinstance(library, Library) else Library(library or default_library())
    with METHODS["adapter"](model, tokenizer, task, train, cfg, adapter=library.expert_path(MULTITASK)) as scored:
        yield scored


@register_method("oracle")
def _oracle_method(model, tokenizer, task, train, cfg):
    """A LoRA trained on the task's own train split: the upper bound."""
    peft_model, _ = train_lora(model, tokenizer, task, train, TrainConfig(seed=cfg.method_seed), progress=False)
    try:
        yield peft_model, []
    finally:
        peft_model.unload()
