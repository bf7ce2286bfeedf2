"""Acceptance on plain input (issue 33): questions typed as a person types them, routed over the committed
library on the real default model. The cases live in tests/cases/plain_inputs.jsonl, so more can be added."""
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
    from lorahub_plus.models import load_base_model

    model, tokenizer = load_base_model()
    router = Router(Library(REPO_ROOT / "library", embedder=embedder, recover=False), model, tokenizer)
    try:
        return router.generate([c["input"] for c in CASES])
    finally:
        router.remove()


def test_plain_arithmetic_is_answered_right(answers):
    arithmetic = [(c, a) for c, a in zip(CASES, answers) if c["expect"]]
    right = [first_number(a) == c["expect"] for c, a in arithmetic]
    assert len(arithmetic) >= 10 and sum(right) >= 0.8 * len(arithmetic), list(zip(arithmetic, right))


def test_plain_questions_get_an_answer(answers):
    assert all(a.strip() for c, a in zip(CASES, answers) if not c["expect"]), answers


def test_route_command_answers_85(capsys):
    main(["route", "What is 47 plus 38?", "--json", "--library", str(REPO_ROOT / "library")])
    row = json.loads(capsys.readouterr().out)[0]
    assert first_number(row["output"]) == "85" and row["experts"], row
