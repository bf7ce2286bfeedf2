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


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's tokens, trailing spaces left to the answer; an empty prompt (some BIG-bench tasks have none)
    is one start token (BOS, else EOS), so the first answer token has a position that predicts it."""
    ids = tokenizer(prompt.rstrip(" "), add_special_tokens=False)["input_ids"]
    return ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]


def encode_pair(tokenizer, prompt: str, answer: str, max_length: int, eos: bool = False) -> Encoded:
    """Prompt and answer tokenized apart, so the boundary is exact; the prompt is cut from the left.

    eos=True ends the answer with the EOS token, so a model trained on it learns where to stop.
    """
    answer = prompt[len(prompt.rstrip(" ")):] + answer  # "A: " + "79" tokenizes as "A:" + " 79", as in running text
    p = prompt_ids(tokenizer, prompt)
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
    a = a[: max_length - 1]
    p = p[-(max_length - len(a)):] if len(p) + len(a) > max_length else p
    return Encoded(p + a, [IGNORE] * len(p) + a)


def encode_examples(tokenizer, pairs: list[tuple], max_length: int) -> list[Encoded]:
    """(task, example) pairs as training sequences: the task's prompt, then the target and EOS (the loss)."""
    return [encode_pair(tokenizer, task.build_prompt(ex), ex.target, max_length, eos=True) for task, ex in pairs]


def collate(items: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded tensors on `device`: input_ids, attention_mask and labels, each (B, T)."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x.input_ids)
        ids[row, :n] = torch.tensor(x.input_ids)
        labels[row, :n] = torch.tensor(x.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def answer_forward(model, batch: dict[str, torch.Tensor], **extra) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets), each at the positions that predict an answer token in some row: (B, P, V), (B, P).

    The LM head runs only there (`logits_to_keep`): on short few-shot prompts it is about a
    fifth of a small model's compute, and the prompt positions never enter the loss. `extra` goes
    to the model (a RoutedModel's `routes`).
    """
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = (targets != IGNORE).any(0).nonzero().squeeze(-1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                   **extra).logits
    if logits.shape[1] != len(keep):
        raise ValueError(f"{type(model).__name__} ignores `logits_to_keep`: got logits for {logits.shape[1]} "
                         f"positions, expected {len(keep)}")
    return logits, targets[:, keep]


def answer_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-probability of the answer tokens, and their count: (B,), (B,).

    logits and targets are aligned, as `answer_forward` returns them.
    """
    mask = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens only (aligned logits and targets)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def length_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped by similar length, so batches carry little padding; with `max_tokens`, a batch also
    holds at most that many tokens padded (rows times its longest), so one long input pads no short ones."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if max_tokens is None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches, current = [], []
    for i in order:  # ascending: the newcomer is the batch's longest
        if current and (len(current) == batch_size or (len(current) + 1) * lengths[i] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches
