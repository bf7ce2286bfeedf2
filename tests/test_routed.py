"""The routed module: per-row and per-token mixtures inside the forward pass, checked rows, generate
with the KV cache and beams, the multiple-choice scorer, sparse top-k paths equal to dense ones."""
import pytest
import torch

from conftest import make_model
from lorahub_plus import routed as routed_module
from lorahub_plus.scoring import EvalConfig, choice_scores
from lorahub_plus.routed import ConstantRouter, RoutedLoRALinear, RoutedModel, top_k
from lorahub_plus.library.stack import load_stack
from lorahub_plus.tasks import load_task

NAMES = ["arithmetic_addition", "word_sorting", "fact_checking", "french_translation"]


@pytest.fixture
def ids(tokenizer):
    return tokenizer(["Q: What is 2 plus 2?\nA: 4", "Sort: banana apple"], return_tensors="pt", padding=True)


@pytest.fixture
def stack(library):
    return load_stack(library, NAMES)


def logits(routed, ids, **kw):
    with torch.no_grad():
        return routed(**ids, **kw).logits


@pytest.mark.parametrize("merge", ["lorahub", "mixture"])
def test_per_row_routes_match_each_row_alone(stack, tokenizer, ids, merge):
    routed = RoutedModel(make_model(tokenizer), stack.modules, merge)
    W = torch.tensor([[1.0, 0.0, 0.5, 0.0], [-0.3, 0.8, 0.2, 0.4]])
    together = logits(routed, ids, routes=W)
    for row in range(2):
        one = {k: v[row:row + 1] for k, v in ids.items()}
        assert torch.allclose(together[row:row + 1], logits(routed, one, routes=W[row:row + 1]), atol=1e-5)
    assert not torch.allclose(together, logits(routed, ids), atol=1e-3)  # no routes, no router: the base model
    restored = routed.remove()
    assert not any(isinstance(m, RoutedLoRALinear) for m in restored.modules())


def test_sparse_rows_equal_the_dense_mixture(stack, tokenizer, ids):
    """One-hot rows take the gathered path (only the chosen experts); the router's (K,) takes the dense one."""
    model = make_model(tokenizer)
    w = torch.tensor([0.0, 0.7, 0.0, 0.0])
    sparse = logits(RoutedModel(model, stack.modules, "mixture"), ids, routes=w.expand(2, 4))
    model = make_model(tokenizer)
    dense = logits(RoutedModel(model, stack.modules, "mixture", router=ConstantRouter(w)), ids)
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_rows_are_checked(stack, tokenizer, ids):
    routed = RoutedModel(make_model(tokenizer), stack.modules, "mixture")
    with pytest.raises(ValueError, match="`routes` has 1 rows, the batch 2"):
        logits(routed, ids, routes=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\(rows, 4\)"):
        logits(routed, ids, routes=torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        logits(routed, ids, routes=torch.full((2, 4), float("nan")))


class TopOneTokenRouter(torch.nn.Module):
    """Per token: the expert indexed by the token's hidden-state sign pattern, weight 1 (a stand-in for a gate)."""

    def layer(self, index):
        return self

    def forward(self, x):
        choice = (x[..., :2] > 0).long() @ torch.tensor([1, 2])  # (B, T) in 0..3
        return torch.nn.functional.one_hot(choice, 4).to(x.dtype)


# tokens gathered at once, one at a time, 3 at a time (80 = 26*3 + 2), expert by expert, or all chosen at once
@pytest.mark.parametrize("chunk", [None, 1, 3, "grouped", "few"])
def test_per_token_routing_computes_only_the_chosen_experts(stack, tokenizer, ids, chunk, monkeypatch):
    routed = RoutedModel(make_model(tokenizer), stack.modules, "mixture", router=TopOneTokenRouter())
    name, layer = next(iter(routed.layers.items()))
    A, B = stack.modules[name]  # (K, r, in), (K, out, r)
    if chunk != "few":  # 4 experts are few: these paths run for many
        monkeypatch.setattr(routed_module, "FEW_EXPERTS", 0)
    if chunk == "grouped":
        monkeypatch.setattr(routed_module, "GROUPED_PAIRS", 1)
    elif chunk:  # the factors of `chunk` tokens with two experts each
        monkeypatch.setattr(routed_module, "GATHER_ELEMENTS", chunk * 2 * A.shape[1] * max(A.shape[2], B.shape[1]))
    ours = logits(routed, ids)
    x = torch.randn(2, 40, A.shape[2])
    sparse = top_k(torch.randn(2, 40, 4), 2, 1.0)  # two experts per token, unequal weights
    w = sparse.dense()
    expected = sum(w[..., k:k + 1] * ((x @ A[k].T) @ B[k].T) for k in range(4))
    for form in (sparse, w, w.requires_grad_()):  # as a router returns it, dense, dense with a gradient
        assert torch.allclose(layer._token_mixture(x, form), expected, atol=1e-5)
    assert not torch.allclose(ours, logits(RoutedModel(make_model(tokenizer), stack.modules, "mixture"), ids))


def _greedy(model, ids, **kw):
    return model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_routes_each_row_with_the_cache_and_beams(stack, tokenizer, beams):
    ids = tokenizer(["Q: What is 2 plus 2?", "Q: What is 3 plus 5?"], return_tensors="pt")  # equal lengths, no padding
    routed = RoutedModel(make_model(tokenizer, init_std=0.2), stack.modules, "mixture")
    W = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    kw = {"num_beams": beams, "num_return_sequences": beams} if beams > 1 else {}
    together = _greedy(routed, ids, routes=W, **kw)
    assert len(together) == 2 * beams
    for row in range(2):
        one = {k: v[row:row + 1] for k, v in ids.items()}
        alone = _greedy(routed, one, routes=W[row:row + 1], **kw)
        assert torch.equal(together[row * beams:(row + 1) * beams], alone)
        assert torch.equal(alone, _greedy(routed, one, routes=W[row:row + 1], use_cache=False, **kw))
    assert not torch.equal(together[:beams], _greedy(routed, {k: v[:1] for k, v in ids.items()}, **kw))


def test_the_multiple_choice_scorer_routes_prompts_and_choices(stack, tokenizer, task_file):
    task = load_task(task_file)
    test = task.examples[:3]
    prompts = [task.build_prompt(ex) for ex in test]
    model = make_model(tokenizer, init_std=0.2)
    routed = RoutedModel(model, stack.modules, "mixture")
    W = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    together, _ = choice_scores(routed, tokenizer, prompts, test, EvalConfig(), routes=W)
    for i in range(3):
        alone, _ = choice_scores(routed, tokenizer, prompts[i:i + 1], test[i:i + 1], EvalConfig(), routes=W[i:i + 1])
        assert torch.allclose(together[i], alone[0], atol=1e-4)
    base, _ = choice_scores(routed, tokenizer, prompts, test, EvalConfig())
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(together, base))


def test_dtype_and_device_follow_the_model(stack, tokenizer, ids):
    routed = RoutedModel(make_model(tokenizer), stack.modules, "lorahub", router=ConstantRouter(torch.ones(4) / 4))
    routed.to(torch.float64)
    layer = next(iter(routed.layers.values()))
    assert layer.A.dtype == torch.float64 and logits(routed, ids).dtype == torch.float64


def test_caches_and_devices_follow_the_weights(stack, tokenizer, ids):
    """The LoraHub factors of a router's weights are merged again after .to() or new weights."""
    router = ConstantRouter(torch.tensor([0.5, 0.0, 0.2, 0.1]))
    routed = RoutedModel(make_model(tokenizer), stack.modules, "lorahub", router=router)
    first = logits(routed, ids)
    routed.to(torch.float64)
    assert logits(routed, ids).dtype == torch.float64
    for layer in routed.layers.values():  # each layer holds its share of the router's weights
        layer.router.weights.mul_(3)
    assert not torch.allclose(logits(routed, ids).float(), first, atol=1e-4)


def test_each_layer_holds_its_share_of_the_router_on_its_own_device(stack, tokenizer):
    """A model split across devices (here: one layer on `meta`) keeps each layer's router state with that layer."""
    from lorahub_plus.routing.gate import GateRouter

    model = make_model(tokenizer)
    name = list(stack.modules)[-1]
    model.get_submodule(name).to("meta")
    in_features = [A.shape[2] for A, _ in stack.modules.values()]
    for router in (GateRouter(in_features, 4), ConstantRouter(torch.ones(len(in_features), 4))):
        routed = RoutedModel(model, stack.modules, "mixture", router=router)
        for layer_name, layer in routed.layers.items():
            device = "meta" if layer_name == name else "cpu"
            assert layer.A.device.type == device
            assert {t.device.type for t in [*layer.router.parameters(), *layer.router.buffers()]} == {device}
        routed.remove()
        assert not any(isinstance(m, RoutedLoRALinear) for m in model.modules())


def test_gradients_reach_every_weight_even_from_one_hot(stack, tokenizer, ids):
    routed = RoutedModel(make_model(tokenizer), stack.modules, "mixture")
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    routed(**ids, routes=w).logits.square().mean().backward()
    assert (w.grad[:, 1:].abs() > 0).all()


def test_generate_reads_beams_from_the_generation_config(stack, tokenizer):
    from transformers import GenerationConfig

    ids = tokenizer(["Q: What is 2 plus 2?"], return_tensors="pt")
    routed = RoutedModel(make_model(tokenizer, init_std=0.2), stack.modules, "mixture")
    out = routed.generate(**ids, routes=torch.tensor([[1.0, 0, 0, 0]]), max_new_tokens=3, pad_token_id=0,
                          generation_config=GenerationConfig(num_beams=2, num_return_sequences=2, do_sample=False))
    assert len(out) == 2


def test_a_failed_injection_leaves_the_model_as_it_was(stack, tokenizer):
    model = make_model(tokenizer)
    bad = {**stack.modules, "model.layers.9.self_attn.q_proj": next(iter(stack.modules.values()))}
    with pytest.raises(AttributeError):
        RoutedModel(model, bad, "mixture")
    assert not any(isinstance(m, RoutedLoRALinear) for m in model.modules())
    RoutedModel(model, stack.modules, "mixture").remove()
