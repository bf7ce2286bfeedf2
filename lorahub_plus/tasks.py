"""Task files (BIG-bench JSON or few-shot JSONL) and the one prompt builder everything uses."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from lorahub_plus.errors import TaskFormatError
from lorahub_plus.library.readers import check_field, parse_json, read_json, read_text

# BIG-bench's own defaults for the optional prefix fields.
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "


@dataclass(frozen=True)
class Example:
    input: str
    target: str
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        """Every accepted answer: the target and its aliases."""
        return (self.target, *self.aliases)


@dataclass
class Task:
    name: str
    examples: list[Example]
    kind: Literal["generative", "multiple_choice"] = "generative"
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    task_prefix: str = ""
    input_prefix: str = DEFAULT_INPUT_PREFIX
    output_prefix: str = DEFAULT_OUTPUT_PREFIX
    choice_prefix: str = DEFAULT_CHOICE_PREFIX
    append_choices_to_input: bool = True
    source: str = ""
    shot_suffix: str = ""  # after each shot's answer (a chat template's end of turn)
    plain: bool = False  # no prefixes of its own (a JSONL file): framed by `prompts.for_model`

    def format_query(self, example: Example) -> str:
        """One example's prompt up to (not including) its answer."""
        text = self.input_prefix + example.input
        if example.choices and self.append_choices_to_input:
            text += "".join(self.choice_prefix + c for c in example.choices)
        return text + self.output_prefix

    def routing_text(self, example: Example) -> str:
        """What retrieval and routing read of an example: its input, or its choices where a multiple-choice task
        leaves the input blank (the choices carry the content); a blank input without choices stays blank."""
        return example.input if example.input.strip() or not example.choices else "\n".join(example.choices)

    def build_prompt(self, example: Example, shots: list[Example] = ()) -> str:
        """Task prefix, then each shot with its answer, then the query; the answer follows it."""
        demos = "".join(self.format_query(s) + s.target + self.shot_suffix for s in shots)
        return (self.task_prefix + demos + self.format_query(example)).lstrip("\n")


def _parse_example(raw, where: str) -> Example:
    check_field(raw, dict, where, "example", TaskFormatError)
    for name in ("input", "target"):
        if name not in raw:
            raise TaskFormatError(f"{where}: missing field `{name}` (a string)")
        check_field(raw[name], str, where, name, TaskFormatError)
    choices = tuple(check_field(raw.get("choices", []), list, where, "choices", TaskFormatError, item=str))
    aliases = tuple(check_field(raw.get("aliases", []), list, where, "aliases", TaskFormatError, item=str))
    if choices and raw["target"] not in choices:
        raise TaskFormatError(f"{where}: field `target` {raw['target']!r} is not one of `choices`")
    return Example(raw["input"], raw["target"], choices, aliases)


def _flag(value, path: Path, name: str) -> bool:
    """true/false, or the strings "true"/"false" that six BIG-bench files hold."""
    value = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    return check_field(value, bool, str(path), name, TaskFormatError)


def _load_bigbench(path: Path) -> Task:
    raw = read_json(path, dict, TaskFormatError)
    examples = check_field(raw.get("examples"), list, str(path), "examples", TaskFormatError)
    if not examples:
        raise TaskFormatError(f"{path}: field `examples` is empty")
    parsed = [_parse_example(e, f"{path}: examples[{i}]") for i, e in enumerate(examples)]
    kind = raw.get("kind", "multiple_choice" if parsed[0].choices else "generative")
    if kind not in ("generative", "multiple_choice"):
        raise TaskFormatError(f"{path}: field `kind` must be 'generative' or 'multiple_choice', got {kind!r}")
    if kind == "multiple_choice" and not all(e.choices for e in parsed):
        raise TaskFormatError(f"{path}: field `kind` is 'multiple_choice' but some examples have no `choices`")
    optional = {
        "task_prefix": "task_prefix", "input_prefix": "example_input_prefix",
        "output_prefix": "example_output_prefix", "choice_prefix": "choice_prefix",
    }
    prefixes = {ours: check_field(raw[theirs], str, str(path), theirs, TaskFormatError)
                for ours, theirs in optional.items() if theirs in raw}
    return Task(
        name=check_field(raw.get("name", path.stem), str, str(path), "name", TaskFormatError),
        examples=parsed, kind=kind,
        description=check_field(raw.get("description", ""), str, str(path), "description", TaskFormatError),
        keywords=[k for k in check_field(raw.get("keywords", []), list, str(path), "keywords", TaskFormatError,
                                         item=str) if k],
        append_choices_to_input=_flag(raw.get("append_choices_to_input", True), path, "append_choices_to_input"),
        source=str(raw.get("source", "")), **prefixes,
    )


def _load_jsonl(path: Path) -> Task:
    """Plain examples, one a line; the prompt policy (`prompts.for_model`) frames them for the model."""
    examples = []
    for lineno, line in enumerate(read_text(path, TaskFormatError).splitlines(), start=1):
        if line.strip():
            where = f"{path}: line {lineno}"
            examples.append(_parse_example(parse_json(line, where, dict, TaskFormatError), where))
            if not examples[-1].input.strip() and not examples[-1].choices:  # choices can carry a task's content
                raise TaskFormatError(f"{where}: field `input` is empty")
    if not examples:
        raise TaskFormatError(f"{path}: no examples (expected one JSON object per line)")
    kind = "multiple_choice" if all(e.choices for e in examples) else "generative"
    return Task(name=path.stem, examples=examples, kind=kind, plain=True)


def load_task(path: str | Path) -> Task:
    """Load a BIG-bench task file (.json) or a few-shot file (.jsonl, one example a line)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFormatError(f"{path}: no such task file")
    return _load_jsonl(path) if path.suffix == ".jsonl" else _load_bigbench(path)


def split_examples(examples: list[Example], n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test): a seeded permutation; the first n_test go to test. Shots come from train."""
    order = np.random.default_rng(seed).permutation(len(examples))
    test = [examples[i] for i in order[:n_test]]
    train = [examples[i] for i in order[n_test:]]
    return train, test


def expert_split(task: Task, n_test: int = 50, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held out) as an expert trains: `n_test` held out, at most a third of the examples, so that a
    small task still has most of its examples to train on. The multitask LoRA and the hypernetwork train on
    the same train part (with the same `n_test` and seed)."""
    if n_test < 0:
        raise ValueError(f"`n_test` must be >= 0, got {n_test}")
    return split_examples(task.examples, min(n_test, len(task.examples) // 3), seed)


def family(name: str) -> str:
    """BIG-bench's parent task; for natural_instructions, the dataset a subtask is built from. `name` is a task
    file's stem (`parent__sub`) or a task's name as cards record it (`parent:sub`): both give the same family."""
    parent, _, sub = name.replace(":", "__").partition("__")
    found = re.match(r"subtask\d+_([a-z0-9]+)", sub)
    return f"{parent}:{found.group(1)}" if parent == "natural_instructions" and found else parent
