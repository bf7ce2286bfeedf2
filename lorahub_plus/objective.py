"""The few-shot objective that composition weights are fitted to and candidates are chosen by."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .encode import answer_forward, answer_logprobs, collate, encode_pair
from .evaluate import EvalConfig, choice_scores
from .fused import FusedLoRAModel
from .tasks import Example, Task

if TYPE_CHECKING:
    from .compose import ComposeConfig


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
