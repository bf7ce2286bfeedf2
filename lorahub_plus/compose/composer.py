"""Compose library experts from a few examples (LoraHub, and better): pick candidates, fit one
weight per expert on the few-shot loss (`objective`, `optimizers`), test the result against the base
model, export a standard PEFT adapter (`library.stack`)."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorahub_plus.version import __version__
from lorahub_plus.library.atomic import atomic_dir, check_output_dir
from lorahub_plus.errors import LibraryError
from lorahub_plus.compose.config import ComposeConfig, Variant
from lorahub_plus.routed import ConstantRouter, RoutedModel
from lorahub_plus.library.store import Library
from lorahub_plus.models import base_model_id
from lorahub_plus.compose.objective import FewShotObjective
from lorahub_plus.compose.optimizers import OPTIMIZERS, pick
from lorahub_plus.library.stack import load_stack, merged_lora, save_peft_adapter
from lorahub_plus.library.train import MULTITASK
from lorahub_plus.hypernet.synthesize import SYNTHESIZED, fallback_threshold, with_synthesized
from lorahub_plus.tasks import Example, Task

logger = logging.getLogger(__name__)


# -- candidates -------------------------------------------------------------------------------------
def select_candidates(library: Library, cfg: ComposeConfig, description: str | None = None,
                      inputs: list[str] | None = None, names: list[str] | None = None,
                      exclude: list[str] = (), variant: Variant | None = None) -> list[tuple[str, float | None]]:
    """(name, retrieval score) of the candidates: given names, a seeded random draw, or the top-k by
    description similarity, example-centroid similarity, or their mean when both are given (by
    `variant.candidates`), with the multitask LoRA added if `variant.multitask`. Experts in `exclude` are never
    candidates."""
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
    if (variant or Variant()).candidates == "random":
        rng = np.random.default_rng(cfg.seed)
        return [(str(n), None) for n in rng.choice(available, min(cfg.k, len(available)), replace=False)]
    if not description and not inputs:
        raise ValueError("`retrieve` needs a description or example inputs")
    ranked = sorted(((s, n) for n, s in library.scores(description, inputs, available).items()), reverse=True)
    if not ranked:
        raise LibraryError(f"{library.path}: no expert could be retrieved (empty library, or no centroids "
                           "and no description)")
    chosen = [(n, s) for s, n in ranked[: cfg.k]]
    if (variant or Variant()).multitask and MULTITASK in available and MULTITASK not in dict(chosen):
        chosen.append(next(((n, s) for s, n in ranked if n == MULTITASK), (MULTITASK, None)))
    return chosen


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
    variant: dict = field(default_factory=dict)  # the benchmark settings it ran with (`Variant`)
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
            keep: bool = False, overwrite: bool = False, exclude: list[str] = (), progress: bool = False,
            variant: Variant | None = None):
    """Fit candidate weights to `task.examples`; write a PEFT adapter and report to `out` if given.

    `out` must not exist yet, or be empty, or (with overwrite) be an earlier output of ours: it is
    checked before any work. Experts in `exclude` are never candidates. The base model is one
    (`include_base`): the report's `base_won` says when no result beat it. Returns (Composition,
    RoutedModel or None): with `keep`, a RoutedModel that applies the fitted weights to every input
    (call `.remove()` when done to get `model` back); otherwise `model` is restored. Plain examples (a JSONL
    file) are asked in the model's chat template (`prompts.for_model`). `progress` shows a bar over the
    objective's evaluations, or is called with (done, total) as they go. `variant`: the settings
    benchmarks/compose_bench compares (default: the measured choices); users do not set them.
    """
    from tqdm.auto import tqdm

    from lorahub_plus.prompts import for_model

    cfg, variant = cfg or ComposeConfig(), variant or Variant()
    if variant.base_test == "loo" and cfg.optimizer != "best-single":
        raise ValueError(f"`base_test` must be 'auto', 'shots', or 'loo' with optimizer 'best-single', got "
                         f"{variant.base_test!r} with {cfg.optimizer!r}")
    if isinstance(names, str) or isinstance(exclude, str):
        raise ValueError("`names` and `exclude` are lists of expert names, not one string")
    if out is not None:
        check_output_dir(Path(out), overwrite)
    task = for_model(task, tokenizer)
    examples = task.examples
    _check_examples(task, examples, tokenizer, cfg.max_length)
    start = time.perf_counter()
    chosen = select_candidates(library, cfg, description or None,
                               [task.routing_text(ex) for ex in examples] if variant.candidates == "retrieve" else None,
                               names, exclude, variant)
    stack = load_stack(library, [n for n, _ in chosen])
    fallback = _fallback(library, cfg, chosen)
    if fallback["synthesized"]:
        stack = with_synthesized(stack, library, description, [(ex.input, ex.target) for ex in examples])
        chosen = chosen + [(SYNTHESIZED, None)]
    routed = RoutedModel(model, stack.modules, cfg.merge)
    try:
        model.eval()
        objective = FewShotObjective(routed, tokenizer, task, examples, cfg, variant)
        total = len(chosen) + 1 if cfg.optimizer == "best-single" else cfg.budget
        bar = objective.bar = _Report(progress, total) if callable(progress) else tqdm(
            total=total, desc=f"composing ({len(chosen)} candidates)", unit="eval", disable=not progress, leave=False)
        evaluations = 0
        w, curve = OPTIMIZERS[cfg.optimizer](objective, len(stack.names), cfg, variant)
        if not all(math.isfinite(x) for x in w.flatten().tolist()):
            raise ValueError("optimization produced non-finite weights")
        base_won, base_test = False, None
        if cfg.include_base and w.abs().sum() > 0:
            base_test = _base_test(cfg, fallback["best_score"], library, variant)
            base_won = _base_wins(objective, w, base_test, variant.loo_se)
            w = torch.zeros_like(w) if base_won else w
        loss, base_loss = objective.selection_losses(torch.stack([w, torch.zeros_like(w)])).tolist()
        curve = curve or [(objective.evaluations, loss)]
        singles = _single_gains(objective, chosen) if base_won or cfg.optimizer == "best-single" else []
        result = Composition(stack.names, [s for _, s in chosen], w.tolist(), loss, curve,
                             evaluations + objective.evaluations, time.perf_counter() - start, asdict(cfg),
                             variant=asdict(variant), base_won=base_won, base_loss=base_loss, candidates=singles,
                             base_test=base_test, fallback=fallback)
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


def _base_test(cfg: ComposeConfig, best_score: float | None, library: Library, variant: Variant | None = None) -> str:
    """`auto`: leave-one-out when no retrieved candidate is close (best retrieval score below the library's
    calibrated `close`, `library calibrate`; an uncalibrated library counts every candidate as far), since then
    an expert that edges the base model on a few shots is more often lucky than right; with a close one (a
    sibling task), the shots stand. Given or randomly drawn candidates have no score: the shots. Otherwise
    `variant.base_test`."""
    variant = variant or Variant()
    if variant.base_test != "auto":
        return variant.base_test
    close = (library.calibration("close") or {}).get("value")
    far = best_score is not None and (close is None or best_score < close)
    return "loo" if far and cfg.optimizer == "best-single" else "shots"


def _base_wins(objective: FewShotObjective, w: torch.Tensor, test: str, se: float = 0.0) -> bool:
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
    picks = [pick(experts[:, [j for j in range(n) if j != i]]) for i in range(n)]
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
    from lorahub_plus.plots import png

    with png(path, 110, ncols=2, figsize=(9, 3.5)) as (_, (ax1, ax2)):
        xs, ys = zip(*result.curve)
        ax1.plot(xs, ys)
        ax1.set(xlabel="objective evaluations", ylabel="best loss so far", title=f"{result.config['optimizer']} "
                f"({result.config['merge']})")
        w = np.asarray(result.weights)
        w = w if w.ndim == 1 else w.mean(0)
        ax2.barh(range(len(w)), w)
        ax2.set_yticks(range(len(w)), [n[:28] for n in result.names], fontsize=6)
        ax2.set(xlabel="weight", title="expert weights")


