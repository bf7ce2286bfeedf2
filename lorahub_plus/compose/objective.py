"""The few-shot objective that composition weights are fitted to and candidates are chosen by."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lorahub_plus.encode import answer_forward, answer_logprobs, collate, encode_examples
from lorahub_plus.scoring import EvalConfig, choice_scores
from lorahub_plus.routed import RoutedModel
from lorahub_plus.tasks import Example, Task

if TYPE_CHECKING:
    from lorahub_plus.compose.config import ComposeConfig, Variant


class FewShotObjective:
    """Mean answer-token cross-entropy on the few-shot examples, plus l1 * mean(|w|) (`variant.l1`).

    Token-mean, so its scale does not depend on how many examples there are. `losses` scores a
    population of weight vectors in one forward: the batch repeats once per vector, each copy routed
    by its own vector. A weight vector is (K,), or one per adapted module (M, K).
    """

    def __init__(self, routed: RoutedModel, tokenizer, task: Task, examples: list[Example], cfg: ComposeConfig,
                 variant: Variant):
        self.routed, self.cfg, self.variant, self.tokenizer = routed, cfg, variant, tokenizer
        self.task, self.examples = task, examples
        self.prompts = [task.build_prompt(ex) for ex in examples]
        self.encoded = encode_examples(tokenizer, [(task, ex) for ex in examples], cfg.max_length)
        self.batch = collate(self.encoded, tokenizer.pad_token_id, routed.device)
        self.choices = self.variant.objective == "auto" and all(ex.choices for ex in examples)
        self.evaluations = 0
        self.bar = None  # a tqdm bar that counts evaluations, set by `compose`
        self._scored: dict[bytes, torch.Tensor] = {}  # selection_losses' rows by weight vector

    def _sums(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each shot's summed answer-token log-probability and token count under each weight vector in W (P, K)
        or (P, M, K): (P, n) each, from one forward."""
        n, P = len(self.batch["input_ids"]), len(W)
        batch = {k: v.repeat(P, 1) for k, v in self.batch.items()}
        total, count = answer_logprobs(*answer_forward(self.routed, batch, routes=W.repeat_interleave(n, 0)))
        self._count(P)
        return total.view(P, n), count.view(P, n)

    def _nll(self, W: torch.Tensor) -> torch.Tensor:
        """(P,) mean answer-token NLL of each weight vector."""
        total, count = self._sums(W)
        return -total.sum(1) / count.sum(1)

    def _count(self, n: int) -> None:
        self.evaluations += n
        if self.bar is not None:
            self.bar.update(n)

    def regularizer(self, W: torch.Tensor) -> torch.Tensor:
        return self.variant.l1 * W.flatten(1).abs().mean(dim=-1)

    @torch.no_grad()
    def losses(self, W: torch.Tensor) -> torch.Tensor:
        """W: (P, K) or (P, M, K) -> (P,) regularized losses."""
        W = W.to(self.routed.device)
        return self._nll(W) + self.regularizer(W)

    def loss(self, w: torch.Tensor) -> float:
        """Regularized loss of one result, w (K,) or (M, K)."""
        return float(self.losses(w[None])[0])

    @torch.no_grad()
    def selection_losses(self, W: torch.Tensor, per_example: bool = False) -> torch.Tensor:
        """(P,) what picks among finished candidates, each row of W one candidate: on multiple-choice
        shots the mean cross-entropy of the right choice among the choices, scored as `evaluate`
        scores them; otherwise `losses`. `per_example`: (P, n), each shot's own. Remembered per weight
        vector, so comparing the chosen candidate with the base model, or leaving shots out, re-scores none."""
        keys = [w.detach().float().cpu().numpy().tobytes() for w in W]
        new = list(dict.fromkeys(k for k in keys if k not in self._scored))
        if new:
            for k, row in zip(new, self._shot_losses(torch.stack([W[keys.index(k)] for k in new]))):
                self._scored[k] = row
        loss, count = torch.stack([self._scored[k] for k in keys]).unbind(-1)  # (P, n) each
        reg = torch.zeros_like(loss[:, 0]) if self.choices else self.regularizer(W.to(loss.device))
        return loss / count + reg[:, None] if per_example else loss.sum(1) / count.sum(1) + reg

    def _shot_losses(self, W: torch.Tensor) -> torch.Tensor:
        """(P, n, 2) each shot's loss and what it is a sum over: the right choice's cross-entropy and 1, or the
        answer tokens' summed NLL and their count."""
        W = W.to(self.routed.device)
        if not self.choices:
            total, count = self._sums(W)
            return torch.stack([-total, count.to(total.dtype)], -1)
        out = []
        for w in W:
            self._count(1)
            scores, _ = choice_scores(self.routed, self.tokenizer, self.prompts, self.examples,
                                      EvalConfig(max_length=self.cfg.max_length), routes=w.expand(len(self.examples), *w.shape))
            out.append(torch.stack([-torch.log_softmax(s.float(), 0)[ex.choices.index(ex.target)]
                                    for s, ex in zip(scores, self.examples)]))
        loss = torch.stack(out)
        return torch.stack([loss, torch.ones_like(loss)], -1)

    def loss_with_grad(self, w: torch.Tensor) -> torch.Tensor:
        """w: (K,) or (M, K) with requires_grad; a scalar to backpropagate."""
        return (self._nll(w[None]) + self.regularizer(w[None]))[0]
