"""Libraries whose experts differ in rank, modules and scaling (rsLoRA, rank/alpha patterns): stacks are
zero-padded to the largest rank, an expert adds nothing where it adapts nothing, and the result is exactly
what peft computes for each expert. DoRA is refused with the reason."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import make_model
from lorahub_plus.compose.composer import compose
from lorahub_plus.compose.config import ComposeConfig, Variant
from lorahub_plus.errors import IncompatibleAdapterError
from lorahub_plus.library.stack import load_stack
from lorahub_plus.routed import RoutedModel
from lorahub_plus.routing.routers import Router, RouterConfig

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {  # name: LoraConfig fields
    "wide": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL, rank_pattern={"down_proj": 2},
                 alpha_pattern={"o_proj": 3.0}),
    "small": dict(r=2, lora_alpha=4, target_modules=["q_proj"]),
}
NAMES = ["word_sorting", "wide", "small"]  # word_sorting: r=4 on q/v


@pytest.fixture
def mixed(library, tokenizer, tmp_path):
    for seed, (name, fields) in enumerate(KINDS.items()):
        with torch.random.fork_rng():
            torch.manual_seed(10 + seed)
            peft_model = get_peft_model(make_model(tokenizer), LoraConfig(init_lora_weights=False, **fields))
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.data *= 20  # visible in the logits
        peft_model.save_pretrained(tmp_path / name)
        library.add(tmp_path / name, name=name, description=f"a {name} expert", examples=[f"{name} input"])
    return library


def peft_logits(model, path, ids):
    peft_model = PeftModel.from_pretrained(model, str(path))
    try:
        with torch.no_grad():
            return peft_model(**ids).logits
    finally:
        peft_model.unload()


def test_the_stack_pads_ranks_and_modules_with_zeros(mixed):
    stack = load_stack(mixed, NAMES)
    assert stack.rank == 8 and len(stack.modules) == 2 * len(ALL)  # every module any expert adapts, 2 layers
    A, B = stack.modules["model.layers.0.mlp.down_proj"]
    assert A[0].abs().sum() == 0 and A[1, 2:].abs().sum() == 0 and A[1, :2].abs().sum() > 0  # r=2 by pattern
    A, B = stack.modules["model.layers.0.self_attn.q_proj"]
    assert A[2, 2:].abs().sum() == 0 and B[2, :, 2:].abs().sum() == 0


def test_a_routed_layer_keeps_only_the_rows_experts_adapt_and_merges_as_the_stack_does(mixed, tokenizer):
    from lorahub_plus.routed import lorahub_merge

    stack = load_stack(mixed, NAMES)
    routed = RoutedModel(make_model(tokenizer), stack.modules, "lorahub")
    w = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, 0.0]])
    for name, layer in routed.layers.items():
        A, B = stack.modules[name]
        module = name.rsplit(".", 1)[1]  # word_sorting r=4 q/v; wide r=8 everywhere, 2 on down; small r=2 q
        ranks = {"q_proj": [4, 8, 2], "v_proj": [4, 8, 0], "down_proj": [0, 2, 0]}.get(module, [0, 8, 0])
        assert layer.ranks.tolist() == ranks and len(layer.A) == sum(ranks) + 1  # packed rows and one zero row
        merged, expected = layer.merged(w), lorahub_merge(w, A, B)
        r = max(ranks)
        assert torch.allclose(merged[0], expected[0][:, :r], atol=1e-6) and torch.allclose(
            merged[1], expected[1][..., :r], atol=1e-6) and expected[0][:, r:].abs().sum() == 0


@pytest.mark.parametrize("expert", NAMES)
def test_selecting_one_heterogeneous_expert_gives_peft_logits(mixed, tokenizer, expert):
    model = make_model(tokenizer)
    ids = tokenizer(["Sort: banana apple", "Q: What is 2 plus 2?"], return_tensors="pt", padding=True)
    expected = peft_logits(model, mixed.expert_path(expert), ids)
    routed = RoutedModel(model, load_stack(mixed, NAMES).modules, "mixture")
    with torch.no_grad():
        got = routed(**ids, routes=torch.eye(3)[[NAMES.index(expert)] * 2]).logits
    routed.remove()
    assert torch.allclose(got, expected, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(model(**ids).logits, expected, atol=1e-3)  # the expert changes them


def test_rows_routed_to_experts_of_different_modules_each_get_peft_logits(mixed, tokenizer):
    """Row 0 to the q/v expert, row 1 to the all-linear one: the MLP is computed for row 1 only."""
    model = make_model(tokenizer)
    ids = tokenizer(["Sort: banana apple", "Q: What is 2 plus 2?"], return_tensors="pt", padding=True)
    expected = [peft_logits(model, mixed.expert_path(name), ids)[i] for i, name in enumerate(NAMES[:2])]
    routed = RoutedModel(model, load_stack(mixed, NAMES).modules, "mixture")
    with torch.no_grad():
        got = routed(**ids, routes=torch.eye(3)[[0, 1]]).logits
    routed.remove()
    assert all(torch.allclose(got[i], expected[i], atol=1e-4) for i in range(2))


def test_a_mixture_of_different_ranks_adds_their_outputs(mixed, tokenizer):
    """Layer 0's q_proj sees the same input under every adapter (nothing before it is adapted), so its output
    under a mixture is the base output plus each expert's change, weighted."""
    model = make_model(tokenizer)
    ids = tokenizer(["Sort: banana apple"], return_tensors="pt")
    q = "model.layers.0.self_attn.q_proj"

    def q_output(call, model_inside, **kw):
        seen = []
        handle = model_inside.get_submodule(q).register_forward_hook(lambda m, i, o: seen.append(o.detach()))
        with torch.no_grad():
            call(**ids, **kw)
        handle.remove()
        return seen[0]

    base = q_output(model, model)
    changes = []
    for name in ("wide", "small"):
        peft_model = PeftModel.from_pretrained(model, str(mixed.expert_path(name)))
        changes.append(q_output(peft_model, peft_model.base_model.model) - base)
        peft_model.unload()
    routed = RoutedModel(model, load_stack(mixed, NAMES).modules, "mixture")
    out = q_output(routed, routed.model, routes=torch.tensor([[0.0, 0.6, -0.3]]))
    routed.remove()
    assert torch.allclose(out, base + 0.6 * changes[0] - 0.3 * changes[1], atol=1e-5)
    assert not torch.allclose(out, base, atol=1e-3)


# per token: tokens gathered at the chosen experts' largest rank, expert by expert at each one's own rank, or
# all chosen experts in one matmul
@pytest.mark.parametrize("path", ["gathered", "grouped", "few"])
def test_per_token_mixtures_of_different_ranks_and_modules_cut_only_padding(mixed, path, monkeypatch):
    import lorahub_plus.routed as routed_module
    from lorahub_plus.routed import RoutedLoRALinear, top_k

    if path != "few":
        monkeypatch.setattr(routed_module, "FEW_EXPERTS", 0)
    if path == "grouped":
        monkeypatch.setattr(routed_module, "GROUPED_PAIRS", 1)
    stack = load_stack(mixed, NAMES).modules
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):  # 3 ranks; 1 expert here
        A, B = stack[module]
        layer = RoutedLoRALinear(torch.nn.Linear(A.shape[2], B.shape[1]), A, B, "mixture", 0)
        x = torch.randn(2, 30, A.shape[2])
        sparse = top_k(torch.randn(2, 30, 3), 2, 1.0)
        w = sparse.dense()
        expected = sum(w[..., k:k + 1] * ((x @ A[k].T) @ B[k].T) for k in range(3))
        assert torch.allclose(layer._token_mixture(x, sparse), expected, rtol=1e-4, atol=1e-4)  # outputs ~ 100
    only = {k: top_k(torch.eye(3)[k].expand(2, 30, 3), 1, 1.0) for k in range(3)}  # one expert for every token
    assert [layer._token_mixture(x, only[k]) is None for k in range(3)] == [True, False, True]  # down_proj: wide


@pytest.mark.parametrize("merge", ["mixture", "lorahub"])
def test_compose_over_mixed_experts_exports_what_it_scored(mixed, tokenizer, tmp_path, merge):
    model = make_model(tokenizer)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"input": f"Sort: b{i} a{i}", "target": f"a{i} b{i}"}) + "\n" for i in range(4)))
    from lorahub_plus.tasks import load_task

    result, routed = compose(model, tokenizer, load_task(few), mixed, ComposeConfig(
        k=3, merge=merge, optimizer="cmaes", budget=6, include_base=False), names=NAMES,
        out=tmp_path / "out", keep=True, variant=Variant(population=3))
    ids = tokenizer(["Sort: pear fig"], return_tensors="pt")
    with torch.no_grad():
        scored = routed(**ids, routes=torch.tensor([result.weights])).logits
    routed.remove()
    assert torch.allclose(peft_logits(model, tmp_path / "out", ids), scored, atol=1e-4)


@pytest.mark.parametrize("router", ["retrieval", "arrow"])
def test_routers_route_over_mixed_experts(mixed, tokenizer, router):
    routing = Router(mixed, make_model(tokenizer), tokenizer, RouterConfig(router=router, k=2, fallback="never"))
    answers = routing.generate(["small input", "Sort: banana apple"], max_new_tokens=3, prompts=["a", "b"])
    assert len(answers) == 2
    explained = routing.explain(["small input"])[0]
    assert explained and all(n in mixed.names() for n, _ in explained)
    routing.remove()


def test_an_expert_absent_from_a_module_never_scores_there_under_arrow(mixed):
    from lorahub_plus.routing.routers import arrow_prototypes

    A, B = load_stack(mixed, NAMES).modules["model.layers.0.mlp.up_proj"]  # only `wide` adapts it
    prototypes = arrow_prototypes(A, B)
    assert prototypes[[0, 2]].abs().sum() == 0 and prototypes[1].norm() == pytest.approx(1.0, abs=1e-5)


def test_a_dora_expert_is_refused_with_the_reason(library, tokenizer, tmp_path):
    get_peft_model(make_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora")
    with pytest.raises(IncompatibleAdapterError, match=r"adapter_config.json: field `use_dora`.*DoRA"):
        library.add(tmp_path / "dora", name="dora", description="a DoRA adapter")
    assert "dora" not in library.names()


def _delta(A, B):
    return B.float() @ A.float()


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_the_mixture_export_is_the_adapter_peft_add_weighted_adapter_makes(library, tokenizer, combination):
    """peft's `add_weighted_adapter` gives the same adapter as our mixture export (`cat`: exact; `svd`: the
    same best rank-r approximation); the LoraHub merge, (sum w B)(sum w A), is kept: peft has no such mode."""
    from lorahub_plus.library.stack import merged_lora

    names, w = ["word_sorting", "arithmetic_addition"], torch.tensor([0.7, -0.4])
    peft_model = PeftModel.from_pretrained(make_model(tokenizer), str(library.expert_path(names[0])), adapter_name=names[0])
    peft_model.load_adapter(str(library.expert_path(names[1])), adapter_name=names[1])
    peft_model.add_weighted_adapter(names, w.tolist(), "mix", combination_type=combination, svd_rank=4)
    ours, _, _ = merged_lora(load_stack(library, names), w, "mixture", export_rank=4 if combination == "svd" else 0)
    for module, (A, B) in ours.items():
        layer = peft_model.base_model.model.get_submodule(module)
        theirs = _delta(layer.lora_A["mix"].weight, layer.lora_B["mix"].weight) * layer.scaling["mix"]
        assert torch.allclose(_delta(A, B), theirs, atol=1e-5)
    lorahub, _, _ = merged_lora(load_stack(library, names), w, "lorahub")
    peft_model.add_weighted_adapter(names, w.abs().tolist(), "linear", combination_type="linear")
    module = next(iter(lorahub))
    layer = peft_model.base_model.model.get_submodule(module)
    linear = _delta(layer.lora_A["linear"].weight, layer.lora_B["linear"].weight) * layer.scaling["linear"]
    assert not torch.allclose(_delta(*lorahub[module]), linear, atol=1e-4)
