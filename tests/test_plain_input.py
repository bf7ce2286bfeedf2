"""Acceptance on plain input (issue 33): questions typed as a person types them, routed over the committed
library on the real default model: to an expert only when it learned the chat framing and is close. The cases live in tests/cases/plain_inputs.jsonl, so more can be added."""
import json
from pathlib import Path

import pytest

from lorahub_plus.cli import main
from lorahub_plus.library.store import Library
from lorahub_plus.paths import REPO_ROOT
from lorahub_plus.routing.routers import Router

pytestmark = pytest.mark.slow
CASES = [json.loads(line) for line in (Path(__file__).parent / "cases" / "plain_inputs.jsonl").read_text().splitlines()
         if line.strip()]


def first_number(text: str) -> str | None:
    """The answer's number: the first after an `=` ("47 + 38 = 85"), else the first (as benchmarks/plain_bench)."""
    import re

    found = re.findall(r"-?\d+(?:\.\d+)?", text.split("=", 1)[1] if "=" in text else text)
    return found[0] if found else None


@pytest.fixture(scope="module")
def answers(embedder):
    """(each case's answer routed, the experts it used, the base model's answer)."""
    from lorahub_plus.models import load_base_model

    model, tokenizer = load_base_model()
    router = Router(Library(REPO_ROOT / "library", embedder=embedder, recover=False), model, tokenizer)
    inputs = [c["input"] for c in CASES]
    try:
        return list(zip(router.generate(inputs), router.explain(inputs),
                        router.generate(inputs, adapters=["none"] * len(inputs))))
    finally:
        router.remove()


def test_plain_arithmetic_close_to_an_expert_is_routed_and_answered_right(answers):
    routed = [(c, a) for c, (a, used, _) in zip(CASES, answers) if c["expect"] and used]
    right = [first_number(a) == c["expect"] for c, a in routed]
    assert len(routed) >= 5 and sum(right) >= 0.8 * len(routed), list(zip(routed, right))


def test_plain_questions_no_expert_learned_are_answered_by_the_base_model(answers):
    """The library's experts that learned the chat framing are the arithmetic ones: other questions get no
    expert, and the base model's own answer."""
    general = [(used, a, base) for c, (a, used, base) in zip(CASES, answers) if not c["expect"]]
    assert len(general) >= 20 and all(not used and a == base and a.strip() for used, a, base in general), general


def test_route_command_answers_85(capsys):
    main(["route", "What is 47 plus 38?", "--json", "--library", str(REPO_ROOT / "library")])
    row = json.loads(capsys.readouterr().out)[0]
    assert first_number(row["output"]) == "85" and row["experts"], row
