"""Integration tests on the real embedded default model and the committed library (marked slow)."""
import json

import pytest

from lorahub_plus.scoring import EvalConfig
from lorahub_plus.evaluation import evaluate
from lorahub_plus.library.store import Library
from lorahub_plus.paths import REPO_ROOT, resolve_task
from lorahub_plus.tasks import load_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    from lorahub_plus.models import load_base_model

    return load_base_model()


def test_default_model_is_smollm2_and_evaluation_is_deterministic(default_model):
    model, tokenizer = default_model
    assert model.config.num_hidden_layers == 30 and model.config._name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    task = load_task(resolve_task("arithmetic__3_digit_subtraction"))
    cfg = EvalConfig(n_test=12, seed=0)
    first, second = evaluate(model, tokenizer, task, "zero-shot", cfg), evaluate(model, tokenizer, task, "zero-shot", cfg)
    assert first.n == 12 and (first.correct, first.tokens) == (second.correct, second.tokens)


def test_default_model_records_the_hub_id_not_a_cache_path(default_model):
    from peft import LoraConfig, get_peft_model

    model, _ = default_model
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    try:
        assert peft_model.peft_config["default"].base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    finally:
        peft_model.unload()


@pytest.fixture(scope="module")
def committed_library(embedder):
    return Library(REPO_ROOT / "library", embedder=embedder, recover=False)  # as committed, for verify


def test_committed_library_verifies(committed_library):
    assert len(committed_library) > 0 and committed_library.verify() == []


def test_committed_expert_reproduces_its_card(committed_library, default_model):
    """An expert's base and expert accuracy, evaluated again on its held-out split, are what its card says (a task of short
    prompts: the check is the same for every card, the cost is not)."""
    model, tokenizer = default_model
    card = committed_library.card("linguistic_mappings__plural_json")
    task = load_task(resolve_task(card.source_task))
    cfg = EvalConfig(n_test=card.metrics["n_test"], shots=0, seed=card.metrics["split_seed"])
    assert evaluate(model, tokenizer, task, "zero-shot", cfg).accuracy == pytest.approx(card.metrics["base_accuracy"])
    expert = evaluate(model, tokenizer, task, "adapter", cfg, adapter=str(committed_library.path / card.name))
    assert expert.accuracy == pytest.approx(card.metrics["expert_accuracy"])


def test_search_finds_paraphrased_experts(committed_library):
    """At least 9 of 10 paraphrases (benchmarks/search_paraphrases.json) rank their expert first."""
    paraphrases = json.loads((REPO_ROOT / "benchmarks" / "search_paraphrases.json").read_text())
    present = {k: v for k, v in paraphrases.items() if k in committed_library.names()}
    assert len(present) >= 10
    hits = sum(committed_library.search(query, 1)[0].name == name for name, query in present.items())
    assert hits >= 0.9 * len(present)
