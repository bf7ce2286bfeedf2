"""Routers: retrieval and arrow weights, parity with peft's Arrow, the Router facade, the route CLI and
the route-* evaluation methods."""
import json
from dataclasses import replace

import pytest
import torch

from conftest import EXPERTS, make_model, set_chat_training
from lorahub_plus.cli import main
from lorahub_plus.scoring import EvalConfig
from lorahub_plus.evaluation import evaluate
from lorahub_plus.routed import top_k_softmax
from lorahub_plus.routing.routers import ArrowRouter, Router, RouterConfig, arrow_prototypes
from lorahub_plus.library.stack import load_stack
from lorahub_plus.tasks import load_task


def test_top_k_softmax_keeps_k_weights_that_sum_to_one():
    w = top_k_softmax(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 2, 0.1)
    assert (w > 0).sum() == 2 and w[0, 1] > w[0, 3] > 0 and torch.isclose(w.sum(), torch.tensor(1.0))


def test_arrow_prototypes_are_top_right_singular_vectors():
    A, B = torch.randn(3, 4, 20), torch.randn(3, 12, 4)
    ours = arrow_prototypes(A, B)
    for k in range(3):
        exact = torch.linalg.svd(B[k] @ A[k]).Vh[0]
        assert torch.isclose((ours[k] @ exact).abs(), torch.tensor(1.0), atol=1e-4)


def test_arrow_matches_peft_arrow(library, tokenizer):
    """Same experts and inputs through peft's create_arrow_model and through ours. peft finds prototypes by 15
    power iterations from a random start, ours by an exact SVD: with ours given to peft, logits agree."""
    from peft import ArrowConfig, create_arrow_model

    names = ["arithmetic_addition", "word_sorting", "fact_checking", "french_translation"]
    ids = tokenizer(["Q: What is 2 plus 2?\nA: 4", "Sort: banana apple cherry"], return_tensors="pt", padding=True)
    theirs_model = create_arrow_model(make_model(tokenizer, init_std=0.2), [str(library.path / n) for n in names],
                                      ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0))
    stack = load_stack(library, names)
    router = ArrowRouter(library, names, stack.modules, RouterConfig(router="arrow", k=2, temperature=1.0))
    with torch.no_grad():
        theirs_model(**ids)  # peft builds its prototypes on the first forward
    layers = {name.removeprefix("base_model.model."): m.lora_arrow["arrow_router"] for name, m in
              theirs_model.named_modules() if "arrow_router" in getattr(m, "lora_arrow", {})}
    assert sorted(layers) == list(stack.modules)
    for index, name in enumerate(stack.modules):  # random LoRAs: close top singular values; peft's 15 steps can be off
        layers[name].prototypes = router.layer(index).prototypes.clone()
    from lorahub_plus.routed import RoutedModel

    ours = RoutedModel(make_model(tokenizer, init_std=0.2), stack.modules, "mixture", router=router)
    with torch.no_grad():
        assert torch.allclose(ours(**ids).logits, theirs_model(**ids).logits, atol=1e-4)


def test_retrieval_routes_each_input_to_its_own_expert(library, tokenizer):
    router = Router(library, make_model(tokenizer), tokenizer, RouterConfig(k=2))
    inputs = [f"{EXPERTS[n][0]} example 7" for n in ("word_sorting", "french_translation")]
    routes = router.rows(inputs).weights
    assert routes.shape == (2, len(library)) and ((routes > 0).sum(-1) == 2).all()
    assert torch.allclose(routes.sum(-1), torch.ones(2))
    explained = router.explain(inputs)
    assert [e[0][0] for e in explained] == ["word_sorting", "french_translation"] and len(explained[0]) == 2
    outputs = router.generate(inputs, max_new_tokens=4)
    assert outputs == router.generate(inputs, max_new_tokens=4, adapters=[None, None])  # the router's rows
    assert outputs != router.generate(inputs, max_new_tokens=4, adapters=["none", "none"])  # not the base model's
    restored = router.remove()
    assert not any(type(m).__name__ == "RoutedLoRALinear" for m in restored.modules())


def test_arrow_facade_explains_per_token_weights(library, tokenizer):
    router = Router(library, make_model(tokenizer), tokenizer, RouterConfig(router="arrow", k=2))
    explained = router.explain(["Sort these words: apple banana"])
    assert 2 <= len(explained[0]) <= len(library) and abs(sum(w for _, w in explained[0]) - 1) < 1e-4
    assert router.rows(["x"]) is None and len(router.generate(["Sort: b a"], max_new_tokens=3)) == 1


@pytest.mark.parametrize("bad, match", [({"k": 0}, "`k`"), ({"temperature": 0.0}, "`temperature`"),
                                        ({"router": "oracle"}, "`router`")])
def test_router_config_refuses_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**bad)


def test_router_config_k_defaults_per_router():
    """Retrieval takes the closest expert alone, arrow 3 per token, the gate its trained k; a given k stays; a
    config copied to another router takes that router's default."""
    assert [RouterConfig(router=r).top_k for r in ("retrieval", "arrow", "gate")] == [1, 3, None]
    assert RouterConfig(router="retrieval", k=3).top_k == 3
    assert replace(RouterConfig(), router="arrow").top_k == 3
    assert replace(RouterConfig(router="arrow"), router="gate").top_k is None
    with pytest.raises(ValueError, match="trained k"):
        RouterConfig(router="gate", k=2)


def test_router_refuses_empty_inputs(library, tokenizer):
    router = Router(library, make_model(tokenizer), tokenizer)
    for bad in ([], [""], "just a string"):
        with pytest.raises(ValueError, match="`inputs`"):
            router.explain(bad)


def test_k_larger_than_the_library_uses_every_expert(library, tokenizer):
    router = Router(library, make_model(tokenizer), tokenizer, RouterConfig(k=50))
    assert (router.rows(["anything"]).weights > 0).sum() == len(library)


@pytest.mark.parametrize("method", ["route-retrieval", "route-arrow"])
def test_route_methods_evaluate_and_restore_the_model(library, tokenizer, task_file, method):
    model = make_model(tokenizer)
    result = evaluate(model, tokenizer, load_task(task_file), method, EvalConfig(n_test=4), library=library)
    assert result.n == 4 and not any(type(m).__name__ == "RoutedLoRALinear" for m in model.modules())


def test_route_cli_prints_experts_weights_and_output(library, tokenizer, model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"input": "Sort a list of words into alphabetical order. example 1"}) + "\n"
                      + json.dumps({"input": "Translate short English sentences into French. example 2"}) + "\n")
    main(["route", "--inputs", str(inputs), "-k", "2", "--max-new-tokens", "3", "--library", str(library.path),
          "--base-model", str(tmp_path / "base"), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["experts"][0]["name"] for r in rows] == ["word_sorting", "french_translation"]
    assert all(len(r["experts"]) == 2 and isinstance(r["output"], str) for r in rows)
    main(["route", "Add two whole numbers and give the sum.", "--library", str(library.path),
          "--base-model", str(tmp_path / "base"), "--max-new-tokens", "2"])
    assert "arithmetic_addition" in capsys.readouterr().out


def test_a_one_expert_library_and_an_input_longer_than_the_context(library, tokenizer, tmp_path):
    from lorahub_plus.library.store import Library

    one = Library.create(tmp_path / "one", make_model(tokenizer), embedder=library.embedder)
    one.add(library.path / "word_sorting", examples=["Sort: b a"])
    for kind in ("retrieval", "arrow"):
        router = Router(one, make_model(tokenizer), tokenizer, RouterConfig(router=kind, k=3))
        assert [n for n, _ in router.explain(["Sort: pear apple"])[0]] == ["word_sorting"]
        long = "apple banana cherry " * 400  # past the tiny model's 512 positions
        assert len(router.generate([long, "Sort: b a"], max_new_tokens=4)) == 2
        with pytest.raises(ValueError, match="no room"):
            router.generate(["x"], max_new_tokens=600)


def test_a_mixed_batch_names_an_expert_a_composition_auto_or_none(library, tokenizer, tmp_path):
    """Each row as S-LoRA/LoRAX serve it, in one generate: the same answers as each row alone."""
    from lorahub_plus.compose.config import ComposeConfig
    from lorahub_plus.compose.composer import compose
    from lorahub_plus.tasks import Example, Task

    few = Task("few", [Example(f"What is {i} plus 1?", str(i + 1)) for i in range(4)])
    model = make_model(tokenizer, init_std=0.2)
    compose(model, tokenizer, few, library, ComposeConfig(optimizer="uniform", merge="mixture", include_base=False),
            names=["word_sorting", "fact_checking"], out=tmp_path / "composed")
    for kind in ("retrieval", "arrow"):
        router = Router(library, model, tokenizer, RouterConfig(router=kind, k=2))
        inputs = ["Q: What is 2 plus 2?", "Q: What is 3 plus 5?", "Q: What is 4 plus 1?", "Q: What is 9 plus 9?"]
        adapters = ["word_sorting", str(tmp_path / "composed"), "auto", "none"]
        together = router.generate(inputs, 4, adapters=adapters)
        alone = [router.generate([x], 4, adapters=[a])[0] for x, a in zip(inputs, adapters)]
        assert together == alone
        rows = router.rows(inputs, adapters)
        routes, auto = rows.weights, rows.auto
        assert routes[0, router.names.index("word_sorting")] == 1 and routes[3].abs().sum() == 0
        assert torch.isclose(routes[1].sum(), torch.tensor(1.0)) and (auto is not None) == (kind == "arrow")
        with pytest.raises(ValueError, match="neither an expert"):
            router.rows(inputs[:1], ["no_such_expert"])
        model = router.remove()


def test_plain_questions_go_only_to_close_experts_that_learned_the_chat_framing(library, tokenizer, tmp_path):
    """word_sorting learned its task's framing only, french_translation the chat framing too: a chat input goes to
    the second when close to it, never to the first, and to no expert (the base model) when none qualifies."""
    for name, chat in (("word_sorting", "off"), ("french_translation", "input")):
        set_chat_training(library, tmp_path, name, chat)
    library.set_calibration("close", 0.6, {"rule": "a test's"})
    router = Router(library, make_model(tokenizer), tokenizer)
    inputs = [f"{EXPERTS[n][0]} example 7" for n in ("word_sorting", "french_translation")] + ["zebra quartz"]
    names = router.names
    assert [names[int(i)] for i in router.rows(inputs).weights.argmax(-1)][:2] == ["word_sorting", "french_translation"]
    plain = router.rows(inputs, chat=True).weights
    assert plain[0].sum() == 0 and plain[2].sum() == 0  # no close expert that learned the chat framing: the base
    assert plain[1].tolist() == [float(n == "french_translation") for n in names]
