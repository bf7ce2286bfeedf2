"""Plain questions, typed as a person types them (tests/cases/plain_inputs.jsonl), answered by the base model and
by retrieval routing over a library, each asked in the chat template (the product's prompt policy) and in
BIG-bench's `Q: ... A:` framing. Rows are kept per library label, so libraries trained before and after a change
compare in one table.
    python benchmarks/plain_bench.py --label chat-trained [--library library]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, barh, write_results  # noqa: E402

from lorahub_plus.library.store import Library
from lorahub_plus.models import load_base_model
from lorahub_plus.paths import REPO_ROOT
from lorahub_plus.prompts import chat_prompt
from lorahub_plus.routing.routers import Router
from lorahub_plus.tasks import DEFAULT_INPUT_PREFIX, DEFAULT_OUTPUT_PREFIX

CASES = REPO_ROOT / "tests" / "cases" / "plain_inputs.jsonl"
ROWS = RESULTS / "plain_bench.rows.jsonl"


def first_number_is(answer: str, expect: str) -> bool:
    """The answer's number is the expected one: the first number after an `=` ("47 + 38 = 85"), else the first
    number ("85", "The answer is 85."), not merely a number somewhere in it."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", answer.split("=", 1)[1] if "=" in answer else answer)
    return bool(numbers) and numbers[0] == expect


def right(answer: str, case: dict) -> bool:
    """Arithmetic (`expect`): its number; a general question (`answers`): one of them as a word in it."""
    if case["expect"]:
        return first_number_is(answer, case["expect"])
    return any(re.search(rf"\b{re.escape(a)}\b", answer, re.IGNORECASE) for a in case.get("answers", [])) \
        if case.get("answers") else bool(answer.strip())


def run(library: Library, label: str) -> list[dict]:
    cases = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
    inputs = [c["input"] for c in cases]
    model, tokenizer = load_base_model()
    router = Router(library, model, tokenizer)
    framed = [(DEFAULT_INPUT_PREFIX + x + DEFAULT_OUTPUT_PREFIX).lstrip("\n") for x in inputs]
    chat = [chat_prompt(tokenizer, x) for x in inputs]
    rows = []
    for method, prompts, adapters in (("base, chat", chat, ["none"] * len(inputs)),
                                      ("base, Q/A framing", framed, ["none"] * len(inputs)),
                                      ("routed, chat", None, None), ("routed, Q/A framing", framed, None),
                                      ("routed, chat, to any expert (no chat rule)", chat, None)):
        start = time.perf_counter()
        answers = router.generate(inputs, 64, prompts=prompts, adapters=adapters)
        seconds = time.perf_counter() - start
        weights = router.rows(inputs, chat=prompts is None).weights  # the rows generate routed (chat prompts given
        # as `prompts` route as task prompts do: to the closest expert, as every chat input did before the chat rule)
        for case, answer, w in zip(cases, answers, weights):
            rows.append({"library": label, "method": method, "input": case["input"], "expect": case["expect"],
                         "answers": case.get("answers", []), "answer": answer[:80], "right": right(answer, case),
                         "expert": "-" if adapters else router.names[int(w.argmax())] if w.any() else "base model",
                         "seconds": round(seconds / len(inputs), 2)})
    router.remove()
    return rows



def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--library", type=Path, default=REPO_ROOT / "library")
    parser.add_argument("--label", required=True, help="names this library's rows (replaced on a rerun)")
    args = parser.parse_args()
    old = [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.is_file() else []
    rows = [r for r in old if r["library"] != args.label] + run(Library(args.library), args.label)
    for r in rows:  # every label scored by today's rule (on the answer's first 80 characters, as kept)
        r["right"] = right(r["answer"], r)
    ROWS.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary: dict[str, list[int]] = {}
    for r in rows:
        if r["expect"] or r.get("answers"):
            key = f"{r['library']}: {r['method']}: {'arithmetic' if r['expect'] else 'general'}"
            summary.setdefault(key, []).append(int(r["right"]))
    barh(list(summary), [sum(v) / len(v) for v in summary.values()], "share of questions answered right",
         RESULTS / "plain_bench.png", (0, 1))
    print(write_results("plain_bench", rows, {k: f"{sum(v)} of {len(v)}" for k, v in summary.items()},
                        f"python benchmarks/plain_bench.py --label {args.label}",
                        "Arithmetic: the answer's number; general: one of the expected answers as a word in the "
                        "answer. A label's rows are what that library answered when it was run."))

if __name__ == "__main__":
    main()
