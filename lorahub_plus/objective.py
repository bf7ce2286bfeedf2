"""The few-shot objective that composition weights are fitted to and candidates are chosen by."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .encode import answer_forward, answer_logprobs, collate, encode_examples
from .evaluate import EvalConfig, choice_scores
from .routed import RoutedModel
from .tasks import Example, Task

if TYPE_CHECKING:
    from .compose import ComposeConfig


class FewShotObjective:
    """Mean answer-token cross-entropy on the few-shot examples, plus l1 * mean(|w|).

    Token-mean, so its scale does not depend on how many examples there are. `losses` scores a
    population of weight vectors in one forward: the batch repeats once per vector, each copy routed
    by its own vector. A weight vector is (K,), or one per adapted module (M, K).
    """

    def __init__(self, routed: RoutedModel, tokenizer, task: Task, examples: list[Example], cfg: ComposeConfig):
        self.routed, self.cfg, self.tokenizer = routed, cfg, tokenizer
        self.task, self.examples = task, examples
        self.prompts = [task.build_prompt(ex) for ex in examples]
        self.encoded = encode_examples(tokenizer, [(task, ex) for ex in examples], cfg.max_length)
        self.batch = collate(self.encoded, tokenizer.pad_token_id, routed.device)
        self.choices = cfg.objective == "auto" and all(ex.choices for ex in examples)
        self.evaluations = 0

    def _nll(self, W: torch.Tensor) -> torch.Tensor:
        """(P,) mean answer-token NLL of each weight vector in W (P, K) or (P, M, K)."""
        n, P = len(self.batch["input_ids"]), len(W)
        batch = {k: v.repeat(P, 1) for k, v in self.batch.items()}
        total, count = answer_logprobs(*answer_forward(self.routed, batch, routes=W.repeat_interleave(n, 0)))
        self.evaluations += P
        return -total.view(P, n).sum(1) / count.view(P, n).sum(1)

    def regularizer(self, W: torch.Tensor) -> torch.Tensor:
        return self.cfg.l1 * W.flatten(1).abs().mean(dim=-1)

    @torch.no_grad()
    def losses(self, W: torch.Tensor) -> torch.Tensor:
        """W: (P, K) or (P, M, K) -> (P,) regularized losses."""
        W = W.to(self.routed.device)
        return self._nll(W) + self.regularizer(W)

    def loss(self, w: torch.Tensor) -> float:
        """Regularized loss of one result, w (K,) or (M, K)."""
        return float(self.losses(w[None])[0])

    @torch.no_grad()
    def selection_losses(self, W: torch.Tensor) -> torch.Tensor:
        """(P,) what picks among finished candidates, each row of W one candidate: on multiple-choice
        shots the mean cross-entropy of the right choice among the choices, scored as `evaluate`
        scores them; otherwise `losses`."""
        if not self.choices:
            return self.losses(W)
        out = []
        for w in W.to(self.routed.device):
            self.evaluations += 1
            scores, _ = choice_scores(self.routed, self.tokenizer, self.prompts, self.examples,
                                      EvalConfig(max_length=self.cfg.max_length), routes=w.expand(len(self.examples), *w.shape))
            out.append(torch.stack([-torch.log_softmax(s.float(), 0)[ex.choices.index(ex.target)]
                                    for s, ex in zip(scores, self.examples)]).mean())
        return torch.stack(out)

    def loss_with_grad(self, w: torch.Tensor) -> torch.Tensor:
        """w: (K,) or (M, K) with requires_grad; a scalar to backpropagate."""
        return (self._nll(w[None]) + self.regularizer(w[None]))[0]
