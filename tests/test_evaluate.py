import torch

from lorahub_plus.encode import answer_forward, answer_logprobs, collate, encode_pair
from lorahub_plus.scoring import EvalConfig, score
from lorahub_plus.evaluation import evaluate, register_method
from lorahub_plus.tasks import Example, Task, load_task


def naive_choice(model, tokenizer, task, example, shots=()):
    """One full forward per choice: the reference the cached scorer must match."""
    prompt = task.build_prompt(example, list(shots))
    batch = collate([encode_pair(tokenizer, prompt, c, 512) for c in example.choices], tokenizer.pad_token_id)
    with torch.no_grad():
        scores = answer_logprobs(*answer_forward(model, batch))[0]
    return example.choices[int(scores.argmax())]


def test_cached_choice_scoring_matches_full_forwards(model, tokenizer, task_file):
    task = load_task(task_file)
    # Ragged choice counts and prompt lengths exercise left padding and cache row selection.
    test = task.examples[:8] + [Example("Is 3 odd?", "yes", ("yes", "no")), Example("Pick", "c", ("a", "bb", "c", "dd"))]
    correct, tokens, _, _ = score(model, tokenizer, task, test, shots=task.examples[20:22], cfg=EvalConfig(batch_size=2))
    expected = [naive_choice(model, tokenizer, task, ex, task.examples[20:22]) == ex.target for ex in test]
    assert correct == expected and tokens > 0


def test_evaluate_is_deterministic_and_counts(model, tokenizer, task_file):
    task = load_task(task_file)
    cfg = EvalConfig(n_test=10, shots=2, seed=1)
    first = evaluate(model, tokenizer, task, "icl", cfg)
    second = evaluate(model, tokenizer, task, "icl", cfg)
    zero = evaluate(model, tokenizer, task, "zero-shot", cfg)
    assert (first.correct, first.tokens) == (second.correct, second.tokens)
    assert first.n == zero.n == 10 and first.shots == 2
    assert first.input_tokens_per_example > zero.input_tokens_per_example


SEEN_TRAIN: list[list[str]] = []


@register_method("test-record-train")
def _record_train(model, tokenizer, task, train, cfg):
    SEEN_TRAIN.append([ex.input for ex in train])
    yield model, train[: cfg.shots]


def test_shot_seed_redraws_shots_from_the_same_train_split(model, tokenizer, task_file):
    task = load_task(task_file)
    SEEN_TRAIN.clear()
    for shot_seed in (-1, 0, 1):
        evaluate(model, tokenizer, task, "test-record-train", EvalConfig(n_test=5, shots=2, shot_seed=shot_seed))
    kept, first, second = SEEN_TRAIN
    assert sorted(kept) == sorted(first) == sorted(second)  # same train split, so the same test set
    assert first[:2] != second[:2] and first != kept


class EchoModel(torch.nn.Module):
    """Generates a fixed continuation, to test the exact-match rule without a trained model."""

    def __init__(self, tokenizer, text):
        super().__init__()
        self.ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    def generate(self, input_ids, max_new_tokens, **_):
        tail = self.ids[:max_new_tokens].expand(len(input_ids), -1)
        return torch.cat([input_ids, tail], dim=1)


def test_generative_exact_match_uses_aliases_and_first_line(tokenizer):
    task = Task("gen", [Example("a", "nineteen", aliases=("19",)), Example("b", "20")], kind="generative")
    correct, _, _, _ = score(EchoModel(tokenizer, " 19\nQ: more"), tokenizer, task, task.examples)
    assert correct == [True, False]


def test_cut_prompts_score_answer_tokens_only(model, tokenizer):
    """When the prompt is cut to fit, every choice is scored after the same (shortest) prompt."""
    task = Task("t", [Example("word " * 40, "a", ("a", "bb bb bb bb", "c c"))], kind="multiple_choice")
    ex = task.examples[0]
    cfg = EvalConfig(max_length=24, max_new_tokens=4)
    prompt = task.build_prompt(ex)
    encoded = [encode_pair(tokenizer, prompt, c, cfg.max_length) for c in ex.choices]
    shared = min(encoded, key=lambda e: e.n_prompt).input_ids[:min(e.n_prompt for e in encoded)]
    rows = [type(e)(shared + e.input_ids[e.n_prompt:], [-100] * len(shared) + e.labels[e.n_prompt:]) for e in encoded]
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        best = ex.choices[int(answer_logprobs(*answer_forward(model, batch))[0].argmax())]
    for target in ex.choices:  # whichever choice the reference prefers must be the one marked correct
        probe = Task("t", [Example(ex.input, target, ex.choices)], kind="multiple_choice")
        assert score(model, tokenizer, probe, probe.examples, cfg=cfg)[0] == [target == best]


def test_every_method_is_registered_when_the_harness_asks():
    """In a fresh interpreter, `evaluation.all_methods()` gives the composition, routing and oracle methods, which the
    product's modules register (the package itself imports none of them)."""
    import subprocess
    import sys

    code = "from lorahub_plus.evaluation import all_methods; print(sorted(all_methods()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert all(m in out for m in ("'compose'", "'lorahub'", "'best-single'", "'uniform'", "'oracle'", "'zero-shot'",
                                  "'hypernet'", "'hypernet-fewshot'", "'multitask'", "'route-gate'"))
