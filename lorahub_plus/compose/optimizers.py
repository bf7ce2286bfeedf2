"""Optimizers of composition weights, by name: each maps (objective, K, config, variant) to (weights, curve of
(evaluations, best loss)); `config` (ComposeConfig) gives the budget and seed, `variant` (Variant) the
benchmarked settings (bound, population, lr, per_layer). `register_optimizer` adds one; a second with the
same name is refused."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from lorahub_plus.compose.objective import FewShotObjective

if TYPE_CHECKING:
    from lorahub_plus.compose.config import ComposeConfig, Variant


Optimizer = Callable[[FewShotObjective, int, "ComposeConfig", "Variant"], tuple[torch.Tensor, list[tuple[int, float]]]]
OPTIMIZERS: dict[str, Optimizer] = {}


def register_optimizer(name: str):
    def wrap(fn: Optimizer) -> Optimizer:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer `{name}` is already registered")
        OPTIMIZERS[name] = fn
        return fn
    return wrap


def _nevergrad(objective: FewShotObjective, K: int, cfg: ComposeConfig, variant: Variant, name: str, workers: int):
    """Ask `workers` candidates, score them in one batched forward, tell; return the recommendation."""
    import nevergrad as ng

    param = ng.p.Array(init=np.zeros(K)).set_bounds(-variant.bound, variant.bound)
    param.random_state = np.random.RandomState(cfg.seed)
    opt = ng.optimizers.registry[name](parametrization=param, budget=cfg.budget, num_workers=workers)
    curve, best = [], float("inf")
    while opt.num_ask < cfg.budget:
        asked = [opt.ask() for _ in range(min(workers, cfg.budget - opt.num_ask))]
        values = objective.losses(torch.tensor(np.stack([a.value for a in asked]), dtype=torch.float32))
        first = objective.evaluations - len(asked)
        for i, (a, v) in enumerate(zip(asked, values.tolist())):
            opt.tell(a, v)
            best = min(best, v)
            curve.append((first + i + 1, best))
    return torch.tensor(opt.provide_recommendation().value, dtype=torch.float32), curve


@register_optimizer("ngopt")
def _ngopt(objective, K, cfg, variant):
    """LoraHub's exact choice: nevergrad NGOpt, one evaluation at a time."""
    return _nevergrad(objective, K, cfg, variant, "NGOpt", 1)


@register_optimizer("cmaes")
def _cmaes(objective, K, cfg, variant):
    """nevergrad's CMA-ES, a population per batched forward."""
    return _nevergrad(objective, K, cfg, variant, "CMA", variant.population)


@register_optimizer("gradient")
def _gradient(objective, K, cfg, variant):
    """Adam on the same objective, from the uniform average (at w=0 the lorahub merge has no gradient)."""
    shape = (len(objective.routed.layers), K) if variant.per_layer else (K,)
    w = torch.full(shape, 1.0 / K, requires_grad=True)
    adam = torch.optim.Adam([w], lr=variant.lr)
    curve, best, best_w = [], float("inf"), w.detach().clone()
    for _ in range(cfg.budget):
        loss = objective.loss_with_grad(w)
        if loss.item() < best:
            best, best_w = loss.item(), w.detach().clone()
        curve.append((objective.evaluations, best))
        (w.grad,) = torch.autograd.grad(loss, [w])  # only w: the base model gets no .grad
        adam.step()
        with torch.no_grad():
            w.clamp_(-variant.bound, variant.bound)
    return best_w, curve


@register_optimizer("gate")
def _gate(objective, K, cfg, variant):
    """A per-token gate (as the library's, top-3) fitted on the shots' answer tokens for `budget` full-batch
    steps, experts frozen; the result is its weights averaged per module over the shots' tokens (M, K): one
    adapter, as every combiner gives, that peft loads. Needs merge='mixture'."""
    from lorahub_plus.routing.gate import GateConfig, GateRouter, train_gate

    routed = objective.routed
    gcfg = GateConfig(epochs=cfg.budget, batch_size=len(objective.examples), seed=cfg.seed)
    gate = GateRouter([layer.A.shape[1] for layer in routed.layers.values()], K, gcfg.k, gcfg.temperature, cfg.seed)
    with routed.routing(gate):
        losses = train_gate(routed, objective.tokenizer, objective.encoded, gcfg, progress=False)
        w = routed.module_weights(objective.batch["input_ids"], objective.batch["attention_mask"])
    objective.evaluations += len(losses)
    return w.cpu().float(), list(enumerate(np.minimum.accumulate(losses).tolist(), start=1))


def single_losses(objective: FewShotObjective, K: int, variant: Variant) -> torch.Tensor:
    """(K,) each candidate alone, by the selection loss; `population` candidates per batched forward."""
    eye = torch.eye(K)
    losses = torch.cat([objective.selection_losses(eye[i:i + variant.population])
                        for i in range(0, K, variant.population)])
    return losses.cpu().nan_to_num(nan=float("inf"))


def pick(losses: torch.Tensor) -> int:
    """The candidate with the lowest mean of its per-shot `losses` (K, n), each shot weighing the same."""
    return int(losses.cpu().nan_to_num(nan=math.inf).mean(1).argmin())  # a failed expert loses


@register_optimizer("best-single")
def _best_single(objective, K, cfg, variant):
    """The one candidate with the lowest selection loss: K evaluations whatever the budget."""
    losses = single_losses(objective, K, variant)
    curve = list(enumerate(torch.cummin(losses, 0).values.tolist(), start=1))
    return torch.eye(K)[int(losses.argmin())], curve


@register_optimizer("uniform")
def _uniform(objective, K, cfg, variant):
    """The plain average: no fitting (compose scores it once, as it scores every result)."""
    return torch.full((K,), 1.0 / K), []
