"""What a user sets for a composition (`ComposeConfig`), and what the benchmarks compare (`Variant`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorahub_plus.compose.optimizers import OPTIMIZERS
from lorahub_plus.library.readers import check_number
from lorahub_plus.routed import Merge


@dataclass
class ComposeConfig:
    k: int = field(default=20, metadata={"help": "candidate experts"})
    merge: Merge = field(default="lorahub", metadata={"help": "lorahub: (sum wB)(sum wA); mixture: sum w BA"})
    optimizer: str = field(default="best-single", metadata={
        "help": "a registered optimizer (OPTIMIZERS); best-single scored highest in benchmarks/compose_bench"})
    budget: int = field(default=40, metadata={"help": "objective evaluations (gradient, gate: steps)"})
    include_base: bool = field(default=True, metadata={
        "help": "the base model (every weight 0) is a candidate: it is kept when no result scores better"})
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
        if self.k < 1 or self.budget < 1:
            raise ValueError("`k` and `budget` must be >= 1")
        if self.optimizer == "gate" and self.merge != "mixture":
            raise ValueError("optimizer 'gate' routes per token: it needs merge='mixture'")
        if self.fallback not in ("auto", "never", "always"):
            raise ValueError(f"`fallback` must be 'auto', 'never' or 'always', got {self.fallback!r}")
        if self.max_length < 8 or self.export_rank < 0 or self.seed < 0:
            raise ValueError(f"`max_length` must be >= 8 tokens, `export_rank` and `seed` >= 0; got {self.max_length}, "
                             f"{self.export_rank}, {self.seed}")


@dataclass(frozen=True)
class Variant:
    """The settings benchmarks/compose_bench compares; the defaults are the measured choices. Users do not set
    them (not in the CLI, the server or `Hub`): `compose(..., variant=Variant(...))` for a benchmark."""
    candidates: Literal["retrieve", "random"] = field(default="retrieve", metadata={
        "help": "retrieve: by description and/or example similarity; random: LoraHub's draw"})
    multitask: bool = field(default=False, metadata={
        "help": "the library's multitask LoRA (one adapter over many tasks) is a candidate even where retrieval "
                "did not pick it"})
    objective: Literal["auto", "tokens"] = field(default="auto", metadata={
        "help": "what picks among finished candidates: auto: on multiple-choice shots, the cross-entropy of the "
                "right choice among the choices (what accuracy counts), else the answer-token loss"})
    base_test: Literal["auto", "shots", "loo"] = field(default="auto", metadata={
        "help": "how the result is tested against the base model (include_base): shots: its loss on the shots; loo "
                "(best-single only): leave one shot out, pick on the rest, score the pick on the shot left out; "
                "auto: loo for best-single when no candidate is close (best retrieval score below the library's calibrated "
                "`close`, `lorahub-plus library calibrate`), else shots"})
    loo_se: float = field(default=1.0, metadata={
        "help": "loo: the expert must beat the base model by more than this many standard errors of its per-shot "
                "gains (the one-standard-error rule: on 5 shots a smaller gain is often luck); 0: any gain"})
    l1: float = field(default=0.05, metadata={"help": "weight of mean(|w|) in the objective"})
    bound: float = field(default=1.5, metadata={"help": "weights live in [-bound, bound]"})
    population: int = field(default=8, metadata={"help": "weight vectors evaluated per batched forward (cmaes)"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate (gradient)"})
    per_layer: bool = field(default=False, metadata={"help": "gradient: one weight per module and expert"})

    def __post_init__(self):
        if self.candidates not in ("retrieve", "random"):
            raise ValueError(f"`candidates` must be 'retrieve' or 'random', got {self.candidates!r}")
        if self.objective not in ("auto", "tokens"):
            raise ValueError(f"`objective` must be 'auto' or 'tokens', got {self.objective!r}")
        if self.base_test not in ("auto", "shots", "loo"):
            raise ValueError(f"`base_test` must be 'auto', 'shots', or 'loo', got {self.base_test!r}")
        check_number("loo_se", self.loo_se, low_inclusive=True)
        check_number("l1", self.l1, low_inclusive=True)
        check_number("bound", self.bound)
        if isinstance(self.population, bool) or not isinstance(self.population, int) or self.population < 1:
            raise ValueError(f"`population` must be a whole number >= 1, got {self.population!r}")
        check_number("lr", self.lr)

