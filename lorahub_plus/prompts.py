"""The one prompt policy. A task file's examples keep the task's own prefixes (BIG-bench's `\\nQ: ` and
`\\nA: ` by default); plain input (a question a person types, a JSONL file of one's own examples) goes
through the base model's chat template when it has one, a user turn per input and an assistant turn per
answer, and through the BIG-bench defaults when it has none."""
from __future__ import annotations

from dataclasses import replace

from lorahub_plus.tasks import DEFAULT_CHOICE_PREFIX, Example, Task

_MARKS = ("\x01U\x01", "\x01A\x01", "\x01V\x01")


_FRAMES: dict[tuple, dict | None] = {}  # by template and special tokens: rendered once per tokenizer kind


def _frame(render) -> dict | None:
    """The template's prefixes, read off a rendered two-turn chat (None: it renders no such chat)."""
    try:
        text = render([{"role": "user", "content": _MARKS[0]}, {"role": "assistant", "content": _MARKS[1]},
                       {"role": "user", "content": _MARKS[2]}])
    except Exception:  # a template that refuses this shape of chat: the task's own prefixes then
        return None
    if any(text.count(m) != 1 for m in _MARKS):
        return None
    head, rest = text.split(_MARKS[0])
    ask, rest = rest.split(_MARKS[1])
    between, tail = rest.split(_MARKS[2])
    if ask != tail:
        return None
    turn = _common_suffix(head, between)  # what opens a user turn (and perhaps closes the one before)
    return {"task_prefix": head[: len(head) - len(turn)], "input_prefix": turn, "output_prefix": ask,
            "shot_suffix": between[: len(between) - len(turn)]}


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n:]


def chat_frame(tokenizer) -> dict | None:
    """Task prefixes that reproduce `tokenizer`'s chat template, or None when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return None
    key = (template, tuple(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())))
    if key not in _FRAMES:
        _FRAMES[key] = _frame(lambda messages: tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True))
    return _FRAMES[key]


def for_model(task: Task, tokenizer) -> Task:
    """`task` as the model should read it: plain examples in the chat template (when the model has one);
    a task with prefixes of its own unchanged."""
    frame = chat_frame(tokenizer) if task.plain else None
    return replace(task, plain=False, **frame) if frame else task


def as_chat(task: Task, tokenizer, choices: bool = True) -> Task | None:
    """`task` asked as a person would, in the chat template: the input as the user's message (its choices
    listed after it, or left out with `choices=False`, and then answered as free text), no task prefix.
    None without a chat template."""
    frame = chat_frame(tokenizer)
    if frame is None:
        return None
    return replace(task, plain=False, append_choices_to_input=choices, kind=task.kind if choices else "generative",
                   choice_prefix=DEFAULT_CHOICE_PREFIX, **frame)


def chat_prompt(tokenizer, text: str) -> str:
    """One plain input as the model should read it: the chat template's user turn and the assistant's cue."""
    return for_model(Task("input", [Example(text, "")], plain=True), tokenizer).build_prompt(Example(text, ""))
