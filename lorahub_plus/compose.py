"""Compose library experts from a few examples (LoraHub, and better): pick candidates, fit one
weight per expert on the few-shot loss (`objective`, `optimizers`), export a standard PEFT adapter
(`stack`). Also the composition methods of `evaluate`."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from . import __version__
from .atomic import atomic_dir, check_output_dir
from .errors import LibraryError
from .evaluate import Prepared, register_method
from .routed import ConstantRouter, Merge, RoutedModel
from .library import Library
from .models import base_model_id
from .objective import FewShotObjective
from .optimizers import OPTIMIZERS, pick, single_losses
from .readers import check_number
from .stack import load_stack, merged_lora, save_peft_adapter
from .synthesize import SYNTHESIZED, fallback_threshold, with_synthesized
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
    budget: int = field(default=40, metadata={"help": "objective evaluations (gradient, gate: steps)"})
    l1: float = field(default=0.05, metadata={"help": "weight of mean(|w|) in the objective"})
    bound: float = field(default=1.5, metadata={"help": "weights live in [-bound, bound]"})
    population: int = field(default=8, metadata={"help": "weight vectors evaluated per batched forward (cmaes)"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate (gradient)"})
    per_layer: bool = field(default=False, metadata={"help": "gradient: one weight per module and expert"})
    include_base: bool = field(default=True, metadata={
        "help": "the base model (every weight 0) is a candidate: it is kept when no result scores better"})
    base_test: Literal["auto", "shots", "loo"] = field(default="auto", metadata={
        "help": "how the result is tested against the base model (include_base): shots: its loss on the shots; loo "
                "(best-single only): leave one shot out, pick on the rest, score the pick on the shot left out; "
                "auto: loo for best-single when no candidate is close (best retrieval score below `close`), else shots"})
    loo_se: float = field(default=1.0, metadata={
        "help": "loo: the expert must beat the base model by more than this many standard errors of its per-shot "
                "gains (the one-standard-error rule: on 5 shots a smaller gain is often luck); 0: any gain"})
    close: float = field(default=0.61, metadata={
        "help": "best retrieval score (the mean of description and example cosines, as retrieve ranks) from which a "
                "candidate counts as close (base_test auto): just above the highest that a dev task with no "
                "family in the library reaches against the whole library (0.605, shot seeds 0-2)"})
    objective: Literal["auto", "tokens"] = field(default="auto", metadata={
        "help": "what picks among finished candidates: auto: on multiple-choice shots, the cross-entropy of the "
                "right choice among the choices (what accuracy counts), else the answer-token loss"})
    prior_se: float = field(default=0.0, metadata={
        "help": "best-single: candidates whose per-shot losses lie within this many standard errors of the lowest "
                "(every shot weighing the same) count as tied, and the best retrieved of them is picked (the "
                "retrieval score as a prior); 0: the lowest selection loss"})
    shrink: float = field(default=1.0, metadata={
        "help": "scale the result's update to the base model by this, in (0, 1], after the base test (shrinkage: "
                "a pick or fit on a few shots overstates its gain); 1: unchanged"})
    top: int = field(default=0, metadata={
        "help": "fit weights over the `top` candidates with the lowest single-expert loss only (0: all k)"})
    fallback: Literal["auto", "never", "always"] = field(default="auto", metadata={
        "help": "add an adapter synthesized by the library's hypernetwork as one more candidate: auto: when the best "
                "retrieval score is below the hypernetwork's calibrated threshold"})
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
        if self.optimizer == "gate" and self.merge != "mixture":
            raise ValueError("optimizer 'gate' routes per token: it needs merge='mixture'")
        if self.fallback not in ("auto", "never", "always"):
            raise ValueError(f"`fallback` must be 'auto', 'never' or 'always', got {self.fallback!r}")
        if self.objective not in ("auto", "tokens"):
            raise ValueError(f"`objective` must be 'auto' or 'tokens', got {self.objective!r}")
        check_number("l1", self.l1, low_inclusive=True)
        check_number("bound", self.bound)
        check_number("lr", self.lr)
        if self.max_length < 8 or self.export_rank < 0 or self.seed < 0:
            raise ValueError(f"`max_length` must be >= 8 tokens, `export_rank` and `seed` >= 0; got {self.max_length}, "
                             f"{self.export_rank}, {self.seed}")
        check_number("loo_se", self.loo_se, low_inclusive=True)
        check_number("prior_se", self.prior_se, low_inclusive=True)
        if not 0 < self.shrink <= 1:  # NaN too
            raise ValueError(f"`shrink` must be a number in (0, 1], got {self.shrink!r}")
        if not -1 <= self.close <= 1:  # NaN too: a cosine
            raise ValueError(f"`close` must be a cosine score in [-1, 1], got {self.close!r}")
        if self.base_test not in ("auto", "shots", "loo") or (self.base_test == "loo" and self.optimizer != "best-single"):
            raise ValueError(f"`base_test` must be 'auto', 'shots', or 'loo' with optimizer 'best-single', got "
                             f"{self.base_test!r} with {self.optimizer!r}")


# -- candidates -------------------------------------------------------------------------------------
def select_candidates(library: Library, cfg: ComposeConfig, description: str | None = None,
                      inputs: list[str] | None = None, names: list[str] | None = None,
                      exclude: list[str] = ()) -> list[tuple[str, float | None]]:
    """(name, retrieval score) of the candidates: given names, a seeded random draw, or the top-k by
    description similarity, example-centroid similarity, or their mean when both are given. Experts
    in `exclude` are never candidates."""
    available = [n for n in library.names() if n not in set(exclude)]
    if not available:
        raise LibraryError(f"{library.path}: no experts to compose (an empty library, or every expert excluded)")
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
class Composition:
    names: list[str]
    retrieval_scores: list[float | None]  # None where not retrieved
    weights: list  # (K,) or (M, K) as nested lists
    loss: float
    curve: list[tuple[int, float]]
    evaluations: int
    seconds: float
    config: dict
    base_won: bool = False  # no expert or mixture beat the base model (by `base_test`): no adapter is written
    base_loss: float | None = None  # the base model's selection loss on the shots
    candidates: list = field(default_factory=list)  # the best single experts: {name, score, gain, se} per shot
    base_test: str | None = None  # how it was tested against the base model (None: it was not)
    fallback: dict = field(default_factory=dict)  # best retrieval score, threshold, and whether one was synthesized
    export_rank: int = 0
    truncation_error: float = 0.0
    out: str | None = None
    lorahub_plus_version: str = __version__

    def to_dict(self) -> dict:
        return asdict(self)

    def expert_weights(self) -> dict[str, float]:
        """{expert: weight} of the experts it uses (per-module weights averaged over the modules)."""
        w = self.weights if not isinstance(self.weights[0], list) else [sum(x) / len(x) for x in zip(*self.weights)]
        return {n: x for n, x in zip(self.names, w) if x}


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
            keep: bool = False, overwrite: bool = False, exclude: list[str] = (), progress: bool = False):
    """Fit candidate weights to `task.examples`; write a PEFT adapter and report to `out` if given.

    `out` must not exist yet, or be empty, or (with overwrite) be an earlier output of ours: it is
    checked before any work. Experts in `exclude` are never candidates. The base model is one
    (`include_base`): the report's `base_won` says when no result beat it. Returns (Composition,
    RoutedModel or None): with `keep`, a RoutedModel that applies the fitted weights to every input
    (call `.remove()` when done to get `model` back); otherwise `model` is restored. Plain examples (a JSONL
    file) are asked in the model's chat template (`prompts.for_model`). `progress` shows a bar over the
    objective's evaluations, or is called with (done, total) as they go.
    """
    from tqdm.auto import tqdm

    from .prompts import for_model

    cfg = cfg or ComposeConfig()
    if isinstance(names, str) or isinstance(exclude, str):
        raise ValueError("`names` and `exclude` are lists of expert names, not one string")
    if out is not None:
        check_output_dir(Path(out), overwrite)
    task = for_model(task, tokenizer)
    examples = task.examples
    _check_examples(task, examples, tokenizer, cfg.max_length)
    start = time.perf_counter()
    chosen = select_candidates(library, cfg, description or None,
                               [task.routing_text(ex) for ex in examples] if cfg.candidates == "retrieve" else None,
                               names, exclude)
    stack = load_stack(library, [n for n, _ in chosen])
    fallback = _fallback(library, cfg, chosen)
    if fallback["synthesized"]:
        stack = with_synthesized(stack, library, description, [(ex.input, ex.target) for ex in examples])
        chosen = chosen + [(SYNTHESIZED, None)]
    routed = RoutedModel(model, stack.modules, cfg.merge)
    try:
        model.eval()
        objective = FewShotObjective(routed, tokenizer, task, examples, cfg, [s for _, s in chosen])
        total = len(chosen) + 1 if cfg.optimizer == "best-single" else cfg.budget
        bar = objective.bar = _Report(progress, total) if callable(progress) else tqdm(
            total=total, desc=f"composing ({len(chosen)} candidates)", unit="eval", disable=not progress, leave=False)
        evaluations = 0
        if cfg.prior_se and objective.scores is None:
            logger.warning("prior_se is ignored: no candidate has a retrieval score (given or randomly drawn)")
        if cfg.top and cfg.top < len(stack.names) and cfg.optimizer != "best-single":
            best = single_losses(objective, len(stack.names), cfg).argsort()[: cfg.top].tolist()
            chosen, evaluations = [chosen[i] for i in best], objective.evaluations
            routed.remove()
            stack = stack.select(best)
            routed = RoutedModel(model, stack.modules, cfg.merge)
            objective = FewShotObjective(routed, tokenizer, task, examples, cfg, [s for _, s in chosen])
            objective.bar = bar
        w, curve = OPTIMIZERS[cfg.optimizer](objective, len(stack.names), cfg)
        if not all(math.isfinite(x) for x in w.flatten().tolist()):
            raise ValueError("optimization produced non-finite weights")
        base_won, base_test = False, None
        if cfg.include_base and w.abs().sum() > 0:
            base_test = _base_test(cfg, fallback["best_score"])
            base_won = _base_wins(objective, w, base_test, cfg.loo_se, cfg.prior_se)
            w = torch.zeros_like(w) if base_won else w
        w = w * (cfg.shrink if cfg.merge == "mixture" else math.sqrt(cfg.shrink))  # lorahub's update is quadratic in w
        loss, base_loss = objective.selection_losses(torch.stack([w, torch.zeros_like(w)])).tolist()
        curve = curve or [(objective.evaluations, loss)]
        singles = _single_gains(objective, chosen) if base_won or cfg.optimizer == "best-single" else []
        result = Composition(stack.names, [s for _, s in chosen], w.tolist(), loss, curve,
                             evaluations + objective.evaluations, time.perf_counter() - start, asdict(cfg),
                             base_won=base_won, base_loss=base_loss, candidates=singles, base_test=base_test,
                             fallback=fallback)
        bar.close()
        if out is not None and base_won:
            result.out = str(out)
            _write_output(None, 0, "", result, Path(out), overwrite)
        elif out is not None:
            lora, rank, err = merged_lora(stack, w, cfg.merge, cfg.export_rank)
            result.export_rank, result.truncation_error, result.out = rank, err, str(out)
            _write_output(lora, rank, base_model_id(model), result, Path(out), overwrite)
        routed.remove()
        return result, (RoutedModel(model, stack.modules, cfg.merge, router=ConstantRouter(w)) if keep else None)
    except BaseException:
        routed.remove()
        raise


class _Report:
    """A progress bar's `update` and `close` that call `report(done, total)` instead of drawing (a server job)."""

    def __init__(self, report, total: int):
        self.report, self.total, self.done = report, total, 0

    def update(self, n: int) -> None:
        self.done += n
        self.report(self.done, self.total)

    def close(self) -> None:
        pass


def _fallback(library: Library, cfg: ComposeConfig, chosen: list[tuple[str, float | None]]) -> dict:
    """Whether a synthesized candidate joins: always, never, or (auto) when the best retrieval score is
    below the threshold calibrated with the library's hypernetwork."""
    scores = [s for _, s in chosen if s is not None]
    best = max(scores) if scores else None
    threshold = fallback_threshold(library) if cfg.fallback == "auto" else None
    synthesized = cfg.fallback == "always" or (threshold is not None and best is not None and best < threshold)
    return {"best_score": best, "threshold": threshold, "synthesized": synthesized}


def _base_test(cfg: ComposeConfig, best_score: float | None) -> str:
    """`auto`: leave-one-out when no retrieved candidate is close, since then an expert that edges the base
    model on a few shots is more often lucky than right; with a close one (a sibling task), the shots
    stand. Given or randomly drawn candidates have no score: the shots."""
    if cfg.base_test != "auto":
        return cfg.base_test
    far = best_score is not None and best_score < cfg.close
    return "loo" if far and cfg.optimizer == "best-single" else "shots"


def _base_wins(objective: FewShotObjective, w: torch.Tensor, test: str, se: float = 0.0, prior_se: float = 0.0) -> bool:
    """Whether the base model scores at least as well on the shots as the result `w`, or (`loo`, best-single's
    w) as the expert picked without each shot (by `pick`, as best-single picks) scores on that shot, give or take
    `se` standard errors of those per-shot gains. The lowest of many losses on the same few shots flatters its expert; a shot it was
    not picked on does not, and the base model, which needs no picking, keeps ties within the noise (the
    one-standard-error rule of cross-validation). In `loo` each shot weighs the same, whatever its answer's
    length."""
    if test == "shots":
        fitted, base = objective.selection_losses(torch.stack([w, torch.zeros_like(w)])).tolist()
        return base <= fitted
    K, n = len(w), len(objective.examples)
    losses = objective.selection_losses(torch.cat([torch.eye(K), torch.zeros(1, K)]), per_example=True)  # (K+1, n)
    losses = losses.nan_to_num(nan=float("inf"))  # as best-single reads a failed expert
    experts, base = losses[:-1], losses[-1]
    picks = [pick(experts[:, [j for j in range(n) if j != i]], objective.scores, prior_se) for i in range(n)]
    gains = base - torch.stack([experts[p, i] for i, p in enumerate(picks)])
    noise = se * float(gains.std()) / math.sqrt(n) if gains.isfinite().all() else 0.0  # compose has n >= 2 shots
    return float(gains.mean()) <= noise


def _single_gains(objective: FewShotObjective, chosen: list[tuple[str, float | None]], top: int = 5) -> list[dict]:
    """The `top` single candidates by their mean per-shot gain over the base model (selection loss), with its
    standard error: no weight is fitted to the shots, so each shot is a held-out test of a single expert."""
    K, n = len(chosen), len(objective.examples)
    losses = objective.selection_losses(torch.cat([torch.eye(K), torch.zeros(1, K)]), per_example=True).cpu()
    gains = losses[-1] - losses[:-1]  # (K, n); NaN where a shot has no answer token
    mean, se = gains.nanmean(1), torch.tensor([g[g.isfinite()].std().item() for g in gains]) / math.sqrt(n)
    finite = lambda x: float(x) if math.isfinite(float(x)) else None  # noqa: E731  (report.json is strict JSON)
    return [{"name": chosen[i][0], "score": chosen[i][1], "gain": finite(mean[i]), "se": finite(se[i])}
            for i in mean.nan_to_num(nan=-float("inf")).argsort(descending=True)[:top].tolist()]


def _write_output(lora, rank: int, base_model: str, result: Composition, out: Path, overwrite: bool) -> None:
    """Adapter, report.json and loss.png land together by rename, or not at all; without `lora` (the base model
    won) the report and plot only."""
    with atomic_dir(out, guard=lambda: check_output_dir(out, overwrite)) as tmp:
        if lora is not None:
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


def _few_shot_task(task: Task, train: list[Example], shots: int) -> Task:
    from dataclasses import replace

    return replace(task, examples=train[:shots])


def _composed(model, tokenizer, task, train, cfg, library, compose_cfg: ComposeConfig, exclude, use_description=True):
    few = _few_shot_task(task, train, cfg.shots)
    result, routed = compose(model, tokenizer, few, library, compose_cfg, exclude=exclude or (),
                             description=task.description if use_description else None, keep=True)
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
