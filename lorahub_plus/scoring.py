"""Scoring: multiple choice by summed log-likelihood, generative by greedy exact match (what cards, compose's
objective and the evaluation harness all count)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from lorahub_plus.encode import encode_pair, length_batches, prompt_ids
from lorahub_plus.models import cache_kwarg
from lorahub_plus.tasks import Example, Task


@dataclass
class EvalConfig:
    shots: int = field(default=5, metadata={"help": "few-shot examples (drawn from the train split) for ICL"})
    n_test: int = field(default=100, metadata={"help": "test examples (the seeded split's first n_test)"})
    seed: int = field(default=0, metadata={"help": "seed of the train/test split"})
    shot_seed: int = field(default=-1, metadata={
        "help": "seed that reorders the train split, so shots vary while the test set stays (-1: keep the order)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    max_length: int = field(default=512, metadata={"help": "tokens per sequence; prompts are cut from the left"})
    max_new_tokens: int = field(default=32, metadata={"help": "cap on generated tokens (generative tasks)"})

    @property
    def method_seed(self) -> int:
        """Seed of a method's own draws (candidates, optimizer, training): the shot seed, else the split seed."""
        return self.shot_seed if self.shot_seed >= 0 else self.seed

    def __post_init__(self):
        for name, low in (("seed", 0), ("shot_seed", -1), ("shots", 0), ("n_test", 1), ("batch_size", 1), ("max_length", 8), ("max_new_tokens", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"`{name}` must be >= {low}, got {getattr(self, name)}")
        if self.max_new_tokens >= self.max_length:
            raise ValueError(f"`max_new_tokens` ({self.max_new_tokens}) must be below `max_length` ({self.max_length})")


def _choice_batches(test: list[Example], rows_per_batch: int) -> list[list[int]]:
    """Consecutive examples whose choices together fill at most `rows_per_batch` rows."""
    batches, current, rows = [], [], 0
    for i, ex in enumerate(test):
        if current and rows + len(ex.choices) > rows_per_batch:
            batches.append(current)
            current, rows = [], 0
        current.append(i)
        rows += len(ex.choices)
    return batches + [current] if current else batches


def choice_scores(model, tokenizer, prompts, test, cfg, progress=False, routes=None) -> tuple[list[torch.Tensor], int]:
    """Per example, the summed log-likelihood of each of its choices (n_choices,), and the tokens processed.

    Each prompt runs once; its KV cache is then shared by all of its choices, so ICL prompts
    with many choices cost one prompt forward, not one per choice. `routes` (one row per example)
    goes to a RoutedModel, indexed as the rows are: by prompt, then by each choice's prompt.
    """
    pad, device, cache_kw = tokenizer.pad_token_id, _device(model), cache_kwarg(model)  # once, not per batch
    per_example, tokens = [None] * len(test), 0
    for batch in tqdm(_choice_batches(test, cfg.batch_size * 4), desc="scoring choices",
                      disable=not progress, leave=False):
        answers = [[encode_pair(tokenizer, prompts[i], c, cfg.max_length) for c in test[i].choices] for i in batch]
        prompt_ids = [min(enc, key=lambda e: e.n_prompt).input_ids[:min(e.n_prompt for e in enc)] for enc in answers]
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompt_ids):  # left padding: every prompt ends at the last column
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
        ids, mask = ids.to(device), mask.to(device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1, **_rows(routes, batch))
        first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): the answer's first token
        owner = [b for b, enc in enumerate(answers) for _ in enc]  # example row of each choice row
        choice_ids = [e.input_ids[e.n_prompt:] for enc in answers for e in enc]  # answers only
        span = max(len(c) for c in choice_ids)
        cids = torch.full((len(owner), span), pad, dtype=torch.long)
        cmask = torch.zeros_like(cids)
        for row, c in enumerate(choice_ids):
            cids[row, :len(c)], cmask[row, :len(c)] = torch.tensor(c), 1
        cids, cmask = cids.to(device), cmask.to(device)
        cache = out["cache"] if "cache" in out else out.past_key_values
        cache.batch_select_indices(torch.tensor(owner, device=device))
        lengths = mask.sum(-1)[owner]  # (R,)
        logits = model(input_ids=cids, attention_mask=torch.cat([mask[owner], cmask], dim=1),
                       position_ids=lengths[:, None] + torch.arange(span, device=device), **{cache_kw: cache},
                       **_rows(routes, [batch[o] for o in owner])).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, cids[:, 1:, None]).squeeze(-1)
        scores = first_logp[owner].gather(-1, cids[:, :1]).squeeze(-1) + (logp * cmask[:, 1:]).sum(-1)  # (R,)
        start = 0
        for i in batch:
            per_example[i] = scores[start:start + len(test[i].choices)].cpu()
            start += len(test[i].choices)
        tokens += int(mask.sum()) + int(cmask.sum())
    return per_example, tokens


def _rows(routes, indices) -> dict:
    """{'routes': the rows of these examples}, or {} for a model that is not routed."""
    return {} if routes is None else {"routes": routes[torch.as_tensor(indices)]}


def _score_choices(model, tokenizer, prompts, test, cfg, progress, routes=None) -> tuple[list[str], int]:
    """Pick, per example, the choice with the highest summed log-likelihood."""
    scores, tokens = choice_scores(model, tokenizer, prompts, test, cfg, progress, routes)
    return [ex.choices[int(s.argmax())] for s, ex in zip(scores, test)], tokens


def _device(model) -> torch.device:
    """Where the model's weights live (a stand-in model without weights runs on the CPU)."""
    return getattr(model, "device", torch.device("cpu"))


def _normalize(text: str) -> str:
    return " ".join(text.strip().split())


def _generate(model, tokenizer, prompts, test, cfg, max_new_tokens, progress, routes=None) -> tuple[list[str], int]:
    """Greedy decoding, cut at the first newline: the answers."""
    ids = [prompt_ids(tokenizer, p)[-(cfg.max_length - max_new_tokens):] for p in prompts]
    answers, tokens, device = [""] * len(test), 0, _device(model)
    for batch in tqdm(length_batches([len(x) for x in ids], cfg.batch_size),
                      desc="generating", disable=not progress, leave=False):
        width = max(len(ids[j]) for j in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, j in enumerate(batch):  # left padding: every row ends where generation starts
            input_ids[row, width - len(ids[j]):] = torch.tensor(ids[j])
            mask[row, width - len(ids[j]):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **_rows(routes, batch))[:, width:]
        for row, j in enumerate(batch):
            text = tokenizer.decode(out[row], skip_special_tokens=True)
            prompt_tail = prompts[j][len(prompts[j].rstrip(" ")):]  # the space moved out of the prompt
            answers[j] = _normalize(text.removeprefix(prompt_tail).split("\n")[0])
        tokens += int(mask.sum()) + out.numel()
    return answers, tokens


def answer_token_budget(tokenizer, task: Task, cap: int) -> int:
    """Enough new tokens for the longest known answer (+2), at most `cap`."""
    longest = max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"])
                  for ex in task.examples for a in ex.answers)
    return min(cap, longest + 2)


class Scored(NamedTuple):
    correct: list[bool]  # per test example: the prediction is the target or an alias (exact match)
    tokens: int  # every token processed
    input_tokens: float  # prompt tokens per example
    predictions: list[str]  # the picked choice, or the generated answer's first line


@torch.no_grad()
def score(model, tokenizer, task: Task, test: list[Example], shots: list[Example] = (),
          cfg: EvalConfig | None = None, progress: bool = False, routes=None) -> Scored:
    """`model` scored on `test` (multiple choice: the likeliest choice; generative: greedy exact match);
    `routes` gives a RoutedModel one row of expert weights per test example."""
    cfg = cfg or EvalConfig()
    model.eval()
    prompts = [task.build_prompt(ex, list(shots)) for ex in test]
    input_tokens = sum(min(len(tokenizer(p, add_special_tokens=False)["input_ids"]), cfg.max_length)
                       for p in prompts) / max(len(prompts), 1)
    if task.kind == "multiple_choice":
        predictions, tokens = _score_choices(model, tokenizer, prompts, test, cfg, progress, routes)
    else:
        budget = answer_token_budget(tokenizer, task, cfg.max_new_tokens)
        predictions, tokens = _generate(model, tokenizer, prompts, test, cfg, budget, progress, routes)
    correct = [p == ex.target if task.kind == "multiple_choice" else _normalize(p) in {_normalize(a) for a in ex.answers}
               for p, ex in zip(predictions, test)]
    return Scored(correct, tokens, input_tokens, predictions)
