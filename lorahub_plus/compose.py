"""Compose library experts from a few examples (LoraHub, and better): pick candidates, fit one
weight per expert on the few-shot loss, export a standard PEFT adapter."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from . import __version__
from .adapters import WEIGHTS_FILE, lora_shapes, rank_and_scale, read_adapter
from .atomic import atomic_dir, check_output_dir
from .encode import answer_forward, answer_logprobs, collate, encode_pair
from .errors import IncompatibleAdapterError, LibraryError
from .evaluate import EvalConfig, choice_scores, register_method
from .fused import FusedLoRAModel, Merge, lorahub_merge
from .library import Library
from .models import base_model_id
from .tasks import Example, Task

logger = logging.getLogger(__name__)


@dataclass
class ComposeConfig:
    k: int = field(default=20, metadata={"help": "candidate experts"})
    candidates: Literal["retrieve", "random"] = field(default="retrieve", metadata={
        "help": "retrieve: by description and/or example similarity; random: LoraHub's draw"})
    merge: Merge = field(default="lorahub", metadata={"help": "lorahub: (sum wB)(sum wA); mixture: sum w BA"})
    optimizer: str = field(default="best-single", metadata={
        "help": "a registered optimizer (OPTIMIZERS); best-single scored highest in benchmarks/compose_bench"})
    budget: int = field(default=40, metadata={"help": "objective evaluations (gradient: steps)"})
    l1: float = field(default=0.05, metadata={"help": "weight of mean(|w|) in the objective"})
    bound: float = field(default=1.5, metadata={"help": "weights live in [-bound, bound]"})
    population: int = field(default=8, metadata={"help": "weight vectors evaluated per batched forward (cmaes)"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate (gradient)"})
    per_layer: bool = field(default=False, metadata={"help": "gradient: one weight per module and expert"})
    include_base: bool = field(default=True, metadata={
        "help": "the base model (every weight 0) is a candidate: it is kept when no result scores better"})
    objective: Literal["auto", "tokens"] = field(default="auto", metadata={
        "help": "what picks among finished candidates: auto: on multiple-choice shots, the cross-entropy of the "
                "right choice among the choices (what accuracy counts), else the answer-token loss"})
    top: int = field(default=0, metadata={
        "help": "fit weights over the `top` candidates with the lowest single-expert loss only (0: all k)"})
    export_rank: int = field(default=0, metadata={"help": "mixture: SVD-truncate to this rank (0: exact)"})
    max_length: int = field(default=256, metadata={"help": "tokens per few-shot sequence"})
    seed: int = field(default=0, metadata={"help": "seed of the random draw and the optimizer"})

    def __post_init__(self):
        if self.merge not in ("lorahub", "mixture"):
            raise ValueError(f"`merge` must be 'lorahub' or 'mixture', got {self.merge!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.k < 1 or self.budget < 1 or self.population < 1 or self.top < 0:
            raise ValueError("`k`, `budget` and `population` must be >= 1, `top` >= 0")
        if self.objective not in ("auto", "tokens"):
            raise ValueError(f"`objective` must be 'auto' or 'tokens', got {self.objective!r}")


# -- candidates -------------------------------------------------------------------------------------
def select_candidates(library: Library, cfg: ComposeConfig, description: str | None = None,
                      inputs: list[str] | None = None, names: list[str] | None = None,
                      exclude: list[str] = ()) -> list[tuple[str, float | None]]:
    """(name, retrieval score) of the candidates: given names, a seeded random draw, or the top-k by
    description similarity, example-centroid similarity, or their mean when both are given. Experts
    in `exclude` are never candidates."""
    available = [n for n in library.names() if n not in set(exclude)]
    if names:
        missing = [n for n in names if n not in available]
        if missing:
            raise LibraryError(f"`candidates` names experts not in {library.path}: {missing}")
        return [(n, None) for n in names]
    if len(available) < cfg.k:
        logger.warning("library has %d experts, fewer than k=%d: using all of them", len(available), cfg.k)
    if cfg.candidates == "random":
        rng = np.random.default_rng(cfg.seed)
        return [(str(n), None) for n in rng.choice(available, min(cfg.k, len(available)), replace=False)]
    if not description and not inputs:
        raise ValueError("`retrieve` needs a description or example inputs")
    scores: dict[str, list[float]] = {n: [] for n in available}
    if description:
        for hit in library.search(description, len(library)):
            scores.get(hit.name, []).append(hit.score)
    if inputs:  # experts added without examples have no centroid: their description score stands alone
        for hit in library.search_by_examples(inputs, len(library)):
            scores.get(hit.name, []).append(hit.score)
    ranked = sorted(((sum(s) / len(s), n) for n, s in scores.items() if s), reverse=True)
    if not ranked:
        raise LibraryError(f"{library.path}: no expert could be retrieved (empty library, or no centroids "
                           "and no description)")
    return [(n, s) for s, n in ranked[: cfg.k]]


@dataclass
class Stack:
    """The candidates' LoRA weights stacked per module: A (K, r, in), B (K, out, r) with scale folded in."""

    names: list[str]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int


def load_stack(library: Library, names: list[str]) -> Stack:
    """Read candidates; refuse mixed ranks or module sets, naming which experts differ and how."""
    per_expert = {}
    for name in names:
        path = library.expert_path(name)
        config, weights = read_adapter(path)
        shapes = lora_shapes(weights, str(path / WEIGHTS_FILE))
        library.check_compatible(shapes, str(path))
        tensors = {}
        for key, value in weights.items():
            module, ab = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
            tensors.setdefault(module, {})[ab[0]] = value.float()
        scaled = {m: (t["A"], t["B"] * rank_and_scale(config, m)[1]) for m, t in tensors.items()}
        ranks = sorted({shape[2] for shape in shapes.values()})
        if len(ranks) > 1:
            raise IncompatibleAdapterError(f"{path}: its modules have ranks {ranks} (`rank_pattern`); stacking "
                                           "needs one rank per expert")
        per_expert[name] = (ranks[0], scaled)
    first = names[0]
    rank, modules = per_expert[first][0], set(per_expert[first][1])
    odd = [f"{n} (r={r}, {len(m)} modules)" for n, (r, m) in per_expert.items() if r != rank or set(m) != modules]
    if odd:
        raise IncompatibleAdapterError(
            f"candidates must share rank and adapted modules ({first}: r={rank}, {len(modules)} modules); "
            f"these differ: {odd}")
    stacked = {m: (torch.stack([per_expert[n][1][m][0] for n in names]),
                   torch.stack([per_expert[n][1][m][1] for n in names])) for m in sorted(modules)}
    return Stack(list(names), stacked, rank)


# -- objective --------------------------------------------------------------------------------------
class FewShotObjective:
    """Mean answer-token cross-entropy on the few-shot examples, plus l1 * mean(|w|).

    Token-mean, so its scale does not depend on how many examples there are. `losses` scores a
    population of weight vectors in one forward: the batch repeats once per vector.
    """

    def __init__(self, fused: FusedLoRAModel, tokenizer, task: Task, examples: list[Example], cfg: ComposeConfig):
        self.fused, self.cfg, self.tokenizer, self.examples = fused, cfg, tokenizer, examples
        self.prompts = [task.build_prompt(ex) for ex in examples]
        encoded = [encode_pair(tokenizer, p, ex.target, cfg.max_length, eos=True) for p, ex in zip(self.prompts, examples)]
        self.batch = collate(encoded, tokenizer.pad_token_id, fused.model.device)
        self.choices = cfg.objective == "auto" and all(ex.choices for ex in examples)
        self.evaluations = 0

    def _nll(self, rows: int) -> torch.Tensor:
        """(rows // n,) mean NLL per weight vector, the batch repeated rows // n times."""
        n = len(self.batch["input_ids"])
        reps = rows // n
        batch = {k: v.repeat(reps, 1) for k, v in self.batch.items()}
        total, count = answer_logprobs(*answer_forward(self.fused.model, batch))
        return -total.view(reps, n).sum(1) / count.view(reps, n).sum(1)

    def regularizer(self, w: torch.Tensor) -> torch.Tensor:
        return self.cfg.l1 * w.abs().mean(dim=-1)

    @torch.no_grad()
    def losses(self, W: torch.Tensor) -> torch.Tensor:
        """W: (P, K) -> (P,) regularized losses."""
        n = len(self.batch["input_ids"])
        self.fused.set_weights(W[0] if len(W) == 1 else W.repeat_interleave(n, dim=0))
        self.evaluations += len(W)
        return self._nll(n * len(W)) + self.regularizer(W.to(self.batch["input_ids"].device))

    @torch.no_grad()
    def loss(self, w: torch.Tensor) -> float:
        """Regularized loss of one result, w (K,) or (M, K) per module; the model stays at w."""
        if w.dim() == 1:
            return float(self.losses(w[None])[0])
        self.fused.set_module_weights(w)
        self.evaluations += 1
        return float(self._nll(len(self.batch["input_ids"]))[0] + self.regularizer(w.flatten()))

    @torch.no_grad()
    def selection_losses(self, W: torch.Tensor) -> torch.Tensor:
        """(P,) what picks among finished candidates, each row of W (P, K) or (P, M, K) one candidate:
        on multiple-choice shots the mean cross-entropy of the right choice among the choices, scored
        as `evaluate` scores them; otherwise `losses`."""
        if not self.choices:
            return self.losses(W) if W.dim() == 2 else torch.tensor([self.loss(w) for w in W])
        out = []
        for w in W:
            (self.fused.set_weights if w.dim() == 1 else self.fused.set_module_weights)(w)
            self.evaluations += 1
            scores, _ = choice_scores(self.fused.model, self.tokenizer, self.prompts, self.examples,
                                      EvalConfig(max_length=self.cfg.max_length))
            out.append(torch.stack([-torch.log_softmax(s.float(), 0)[ex.choices.index(ex.target)]
                                    for s, ex in zip(scores, self.examples)]).mean())
        return torch.stack(out)

    def loss_with_grad(self, w: torch.Tensor, per_module: bool) -> torch.Tensor:
        """w: (K,) or (M, K) with requires_grad; a scalar to backpropagate."""
        if per_module:
            self.fused.set_module_weights(w)
        else:
            self.fused.set_weights(w)
        self.evaluations += 1
        return self._nll(len(self.batch["input_ids"]))[0] + self.regularizer(w.flatten())


# -- optimizers -------------------------------------------------------------------------------------
# An optimizer maps (objective, K, config) to (weights, curve of (evaluations, loss)).
Optimizer = Callable[[FewShotObjective, int, ComposeConfig], tuple[torch.Tensor, list[tuple[int, float]]]]
OPTIMIZERS: dict[str, Optimizer] = {}


def register_optimizer(name: str):
    def wrap(fn: Optimizer) -> Optimizer:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer `{name}` is already registered")
        OPTIMIZERS[name] = fn
        return fn
    return wrap


def _nevergrad(objective: FewShotObjective, K: int, cfg: ComposeConfig, name: str, workers: int):
    """Ask `workers` candidates, score them in one batched forward, tell; return the recommendation."""
    import nevergrad as ng

    param = ng.p.Array(init=np.zeros(K)).set_bounds(-cfg.bound, cfg.bound)
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
def _ngopt(objective, K, cfg):
    """LoraHub's exact choice: nevergrad NGOpt, one evaluation at a time."""
    return _nevergrad(objective, K, cfg, "NGOpt", 1)


@register_optimizer("cmaes")
def _cmaes(objective, K, cfg):
    """nevergrad's CMA-ES, a population per batched forward."""
    return _nevergrad(objective, K, cfg, "CMA", cfg.population)


@register_optimizer("gradient")
def _gradient(objective, K, cfg):
    """Adam on the same objective, from the uniform average (at w=0 the lorahub merge has no gradient)."""
    shape = (len(objective.fused.modules), K) if cfg.per_layer else (K,)
    w = torch.full(shape, 1.0 / K, requires_grad=True)
    adam = torch.optim.Adam([w], lr=cfg.lr)
    curve, best, best_w = [], float("inf"), w.detach().clone()
    for _ in range(cfg.budget):
        loss = objective.loss_with_grad(w, cfg.per_layer)
        if loss.item() < best:
            best, best_w = loss.item(), w.detach().clone()
        curve.append((objective.evaluations, best))
        (w.grad,) = torch.autograd.grad(loss, [w])  # only w: the base model gets no .grad
        adam.step()
        with torch.no_grad():
            w.clamp_(-cfg.bound, cfg.bound)
    return best_w, curve


def single_losses(objective: FewShotObjective, K: int, cfg: ComposeConfig) -> torch.Tensor:
    """(K,) each candidate alone, by the selection loss; `population` candidates per batched forward."""
    eye = torch.eye(K)
    losses = torch.cat([objective.selection_losses(eye[i:i + cfg.population]) for i in range(0, K, cfg.population)])
    return losses.cpu().nan_to_num(nan=float("inf"))


@register_optimizer("best-single")
def _best_single(objective, K, cfg):
    """The one candidate with the lowest selection loss: K evaluations whatever the budget."""
    losses = single_losses(objective, K, cfg)
    return torch.eye(K)[int(losses.argmin())], list(enumerate(torch.cummin(losses, 0).values.tolist(), start=1))


@register_optimizer("uniform")
def _uniform(objective, K, cfg):
    """The plain average: no fitting (compose scores it once, as it scores every result)."""
    return torch.full((K,), 1.0 / K), []


# -- export -----------------------------------------------------------------------------------------
def merged_lora(stack: Stack, w: torch.Tensor, merge: Merge, export_rank: int = 0
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, float]:
    """Per module (A, B) at scale 1, the rank, and the relative SVD truncation error (0 if exact).

    lorahub: A = sum w_k A_k, B = sum w_k B_k (rank r). mixture: A = [w_k A_k], B = [B_k] stacked
    (rank K*r, exact), or its best rank-`export_rank` approximation by SVD.
    """
    out, errors = {}, []
    for i, (module, (A, B)) in enumerate(stack.modules.items()):
        wi = w[i] if w.dim() == 2 else w  # (K,)
        if merge == "lorahub":
            out[module] = lorahub_merge(wi, A, B)
            continue
        A_cat = (wi[:, None, None] * A).flatten(0, 1)  # (K*r, in)
        B_cat = B.permute(1, 0, 2).flatten(1)  # (out, K*r)
        if export_rank and export_rank < A_cat.shape[0]:
            delta = B_cat @ A_cat  # (out, in)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            A_cat, B_cat = Vh[:export_rank], U[:, :export_rank] * S[:export_rank]
            errors.append(float(S[export_rank:].square().sum().sqrt() / S.square().sum().sqrt().clamp(min=1e-12)))
        out[module] = (A_cat, B_cat)
    rank = next(iter(out.values()))[0].shape[0]
    return out, rank, max(errors, default=0.0)


def save_peft_adapter(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, base_model: str, out: Path) -> None:
    """A standard PEFT LoRA folder (alpha = r, so scale 1) that PeftModel.from_pretrained loads as is."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted({m.rsplit(".", 1)[-1] for m in lora}),
                        lora_dropout=0.0, task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    config.save_pretrained(str(out))
    tensors = {}
    for module, (A, B) in lora.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous().float()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous().float()
    save_file(tensors, str(out / WEIGHTS_FILE))


# -- the facade -------------------------------------------------------------------------------------
@dataclass
class Composition:
    names: list[str]
    retrieval_scores: list[float | None]  # None where not retrieved
    weights: list  # (K,) or (M, K) as nested lists
    loss: float
    curve: list[tuple[int, float]]
    evaluations: int
    seconds: float
    config: dict
    base_won: bool = False  # no expert or mixture scored better than the base model on the shots
    export_rank: int = 0
    truncation_error: float = 0.0
    out: str | None = None
    lorahub_plus_version: str = __version__

    def to_dict(self) -> dict:
        return asdict(self)


def _check_examples(task: Task, examples: list[Example], tokenizer, max_length: int) -> None:
    if len(examples) < 2:
        raise ValueError(f"composition needs at least 2 examples, got {len(examples)} (from `{task.name}`)")
    for i, ex in enumerate(examples):
        n = len(tokenizer(task.build_prompt(ex) + ex.target, add_special_tokens=False)["input_ids"])
        if n > max_length:
            logger.warning("example %d of `%s` has %d tokens; its prompt is cut from the left to %d",
                           i, task.name, n, max_length)


def compose(model, tokenizer, task: Task, library: Library, cfg: ComposeConfig | None = None,
            description: str | None = None, names: list[str] | None = None, out: str | os.PathLike | None = None,
            keep_fused: bool = False, overwrite: bool = False, exclude: list[str] = ()):
    """Fit candidate weights to `task.examples`; write a PEFT adapter and report to `out` if given.

    `out` must not exist yet, or be empty, or (with overwrite) be an earlier output of ours: it is
    checked before any work. Experts in `exclude` are never candidates. The base model is one
    (`include_base`): the report's `base_won` says when no result beat it. Returns (Composition,
    FusedLoRAModel or None): with keep_fused the model stays fused at the fitted weights (call
    `.remove()` when done); otherwise it is restored.
    """
    cfg = cfg or ComposeConfig()
    if out is not None:
        check_output_dir(Path(out), overwrite)
    examples = task.examples
    _check_examples(task, examples, tokenizer, cfg.max_length)
    start = time.perf_counter()
    chosen = select_candidates(library, cfg, description or None,
                               [ex.input for ex in examples] if cfg.candidates == "retrieve" else None, names, exclude)
    stack = load_stack(library, [n for n, _ in chosen])
    fused = FusedLoRAModel(model, stack.modules, cfg.merge)
    try:
        model.eval()
        objective = FewShotObjective(fused, tokenizer, task, examples, cfg)
        evaluations = 0
        if cfg.top and cfg.top < len(stack.names) and cfg.optimizer != "best-single":
            keep = single_losses(objective, len(stack.names), cfg).argsort()[: cfg.top].tolist()
            chosen, evaluations = [chosen[i] for i in keep], objective.evaluations
            fused.remove()
            stack = load_stack(library, [n for n, _ in chosen])
            fused = FusedLoRAModel(model, stack.modules, cfg.merge)
            objective = FewShotObjective(fused, tokenizer, task, examples, cfg)
        w, curve = OPTIMIZERS[cfg.optimizer](objective, len(stack.names), cfg)
        if not all(math.isfinite(x) for x in w.flatten().tolist()):
            raise ValueError("optimization produced non-finite weights")
        base_won = False
        if cfg.include_base and w.abs().sum() > 0:
            fitted, base = objective.selection_losses(torch.stack([w, torch.zeros_like(w)])).tolist()
            base_won = base <= fitted
            w = torch.zeros_like(w) if base_won else w
        loss = objective.loss(w)  # also leaves the fused model at w
        curve = curve or [(objective.evaluations, loss)]
        result = Composition(stack.names, [s for _, s in chosen], w.tolist(), loss, curve,
                             evaluations + objective.evaluations, time.perf_counter() - start, asdict(cfg),
                             base_won=base_won)
        if out is not None:
            lora, rank, err = merged_lora(stack, w, cfg.merge, cfg.export_rank)
            result.export_rank, result.truncation_error, result.out = rank, err, str(out)
            _write_output(lora, rank, base_model_id(model), result, Path(out))
        if not keep_fused:
            fused.remove()
            fused = None
        return result, fused
    except BaseException:
        fused.remove()
        raise


def _write_output(lora, rank: int, base_model: str, result: Composition, out: Path) -> None:
    """Adapter, report.json and loss.png land together by rename, or not at all."""
    with atomic_dir(out) as tmp:
        save_peft_adapter(lora, rank, base_model, tmp)
        (tmp / "report.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        plot_curve(result, tmp / "loss.png")


def plot_curve(result: Composition, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    xs, ys = zip(*result.curve)
    ax1.plot(xs, ys)
    ax1.set(xlabel="objective evaluations", ylabel="best loss so far", title=f"{result.config['optimizer']} "
            f"({result.config['merge']})")
    w = np.asarray(result.weights)
    w = w if w.ndim == 1 else w.mean(0)
    ax2.barh(range(len(w)), w)
    ax2.set_yticks(range(len(w)), [n[:28] for n in result.names], fontsize=6)
    ax2.set(xlabel="weight", title="expert weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- evaluation methods -----------------------------------------------------------------------------
def _few_shot_task(task: Task, train: list[Example], shots: int) -> Task:
    from dataclasses import replace

    return replace(task, examples=train[:shots])


def _composed(model, tokenizer, task, train, cfg, library, compose_cfg: ComposeConfig, exclude, use_description=True):
    few = _few_shot_task(task, train, cfg.shots)
    _, fused = compose(model, tokenizer, few, library, compose_cfg, exclude=exclude or (),
                       description=task.description if use_description else None, keep_fused=True)
    try:
        yield model, []
    finally:
        fused.remove()


@register_method("lorahub")
def _lorahub_method(model, tokenizer, task, train, cfg, library=None, exclude=None):
    """Faithful LoraHub: 20 random candidates, NGOpt, budget 40, (sum wB)(sum wA), no base candidate."""
    yield from _composed(model, tokenizer, task, train, cfg, library, ComposeConfig(
        candidates="random", optimizer="ngopt", merge="lorahub", include_base=False, objective="tokens",
        seed=cfg.method_seed), exclude, use_description=False)


@register_method("compose")
def _compose_method(model, tokenizer, task, train, cfg, library=None, compose_cfg=None, exclude=None):
    """ComposeConfig's defaults (or `compose_cfg`): candidates retrieved by description and examples."""
    yield from _composed(model, tokenizer, task, train, cfg, library, compose_cfg or ComposeConfig(seed=cfg.method_seed),
                         exclude)


@register_method("uniform")
def _uniform_method(model, tokenizer, task, train, cfg, library=None, exclude=None):
    yield from _composed(model, tokenizer, task, train, cfg, library,
                         ComposeConfig(optimizer="uniform", include_base=False, seed=cfg.method_seed), exclude)


@register_method("best-single")
def _best_single_method(model, tokenizer, task, train, cfg, library=None, exclude=None):
    """The retrieved candidate with the lowest few-shot answer-token loss (the default until issue 10)."""
    yield from _composed(model, tokenizer, task, train, cfg, library, ComposeConfig(
        optimizer="best-single", include_base=False, objective="tokens", seed=cfg.method_seed), exclude)


@register_method("oracle")
def _oracle_method(model, tokenizer, task, train, cfg):
    """A LoRA trained on the task's own train split: the upper bound."""
    from .train import TrainConfig, train_lora

    peft_model, _ = train_lora(model, tokenizer, task, train, TrainConfig(seed=cfg.method_seed), progress=False)
    try:
        yield peft_model, []
    finally:
        peft_model.unload()
