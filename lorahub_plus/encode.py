"""Tokenize (prompt, answer) pairs with a target-only loss mask, batch them, and score them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens: loss and scores cover the answer only

    @property
    def n_prompt(self) -> int:
        return sum(1 for x in self.labels if x == IGNORE)


def encode_pair(tokenizer, prompt: str, answer: str, max_length: int, eos: bool = False) -> Encoded:
    """Prompt and answer tokenized apart, so the boundary is exact; the prompt is cut from the left.

    eos=True ends the answer with the EOS token, so a model trained on it learns where to stop.
    """
    stripped = prompt.rstrip(" ")  # "A: " + "79" tokenizes as "A:" + " 79", as in running text
    answer = prompt[len(stripped):] + answer
    p = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
    a = a[: max_length - 1]
    p = p[-(max_length - len(a)):] if len(p) + len(a) > max_length else p
    return Encoded(p + a, [IGNORE] * len(p) + a)


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask and labels, each (B, T)."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x.input_ids)
        ids[row, :n] = torch.tensor(x.input_ids)
        labels[row, :n] = torch.tensor(x.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-probability of the answer tokens, and their count: (B,), (B,)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t+1
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens only."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length, so batches carry little padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
