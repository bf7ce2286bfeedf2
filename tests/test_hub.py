"""The front door: one library, its base model loaded on first use, and the jobs through it."""
import pytest

from conftest import make_model, save_random_lora
from lorahub_plus import Hub


@pytest.fixture
def hub(library, saved_base):
    return Hub(library.path, saved_base)


def test_search_needs_no_model(hub):
    assert hub.search("translate a sentence to French", 1)[0].name == "french_translation" and hub._loaded is None


def test_generate_routes_each_input_or_takes_the_named_adapters(hub):
    inputs = ["Sort a list of words into alphabetical order.", "Translate short English sentences into French."]
    routed = hub.generate(inputs, max_new_tokens=3, fallback="never")
    assert routed == hub.generate(inputs, adapters=["word_sorting", "french_translation"], max_new_tokens=3,
                                  fallback="never")  # retrieval k=1 routes each to its own expert
    assert [e[0][0] for e in hub.explain(inputs, fallback="never")] == ["word_sorting", "french_translation"]


def test_compose_takes_pairs_and_gives_the_model_back(hub, tmp_path):
    hub.generate(["add two numbers"], max_new_tokens=1, fallback="never")  # a router holds the model
    result = hub.compose([(f"What is {a} plus 2?", str(a + 2)) for a in range(4)], description="add two numbers",
                         out=tmp_path / "out", k=2)
    assert len(result.names) == 2 and not any("routed" in type(m).__name__.lower() for m in hub.model.modules())


def test_an_added_expert_is_routed_at_once(hub, tokenizer, tmp_path):
    hub.generate(["anything"], max_new_tokens=1, fallback="never")
    src = save_random_lora(make_model(tokenizer), tmp_path / "new", seed=21)
    hub.add(src, name="new_expert", description="A new expert about bird songs.")
    assert "new_expert" in hub.router("retrieval", fallback="never").names
    assert hub.explain(["A new expert about bird songs."], fallback="never")[0][0][0] == "new_expert"
