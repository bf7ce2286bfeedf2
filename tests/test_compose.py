import json

import pytest
import torch

from conftest import make_model, save_random_lora
from lorahub_plus.compose.config import ComposeConfig, Variant
from lorahub_plus.compose.composer import _base_test, _base_wins, compose, select_candidates
from lorahub_plus.compose.objective import FewShotObjective
from lorahub_plus.compose.optimizers import OPTIMIZERS, pick
from lorahub_plus.library.stack import load_stack, merged_lora, save_peft_adapter
from lorahub_plus.errors import LibraryError
from lorahub_plus.scoring import EvalConfig
from lorahub_plus.evaluation import evaluate, method_options
from lorahub_plus.routed import RoutedModel
from lorahub_plus.tasks import Example, Task, load_task

NAMES = ["arithmetic_addition", "word_sorting", "fact_checking"]


@pytest.fixture
def ids(tokenizer):
    return tokenizer(["Q: What is 2 plus 2?\nA: 4", "Sort: banana apple"], return_tensors="pt", padding=True)


def peft_logits(model_factory, folder, batch):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model_factory(), str(folder)).eval()
    with torch.no_grad():
        return peft_model(**batch).logits


@pytest.mark.parametrize("merge, export_rank", [("lorahub", 0), ("mixture", 0)])
def test_exported_adapter_reproduces_fused_logits(library, tokenizer, ids, tmp_path, merge, export_rank):
    stack = load_stack(library, NAMES)
    w = torch.tensor([0.7, -0.4, 1.1])
    model = make_model(tokenizer)
    routed = RoutedModel(model, stack.modules, merge)
    with torch.no_grad():
        ours = routed(**ids, routes=w.expand(2, 3)).logits
        base = routed(**ids).logits
    lora, rank, err = merged_lora(stack, w, merge, export_rank)
    assert rank == (4 if merge == "lorahub" else 12) and err == 0.0
    save_peft_adapter(lora, rank, "tiny", tmp_path / "out")
    theirs = peft_logits(lambda: make_model(tokenizer), tmp_path / "out", ids)
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(ours, base, atol=1e-3)


def test_svd_truncation_reports_its_error(library):
    stack = load_stack(library, NAMES)
    w = torch.tensor([0.7, -0.4, 1.1])
    _, rank, err = merged_lora(stack, w, "mixture", export_rank=2)
    assert rank == 2 and 0.0 < err < 1.0
    _, _, none = merged_lora(stack, w, "mixture", export_rank=12)
    assert none == 0.0


def few_shot(n=5):
    return Task("few", [Example(f"What is {i} plus {i + 1}?", str(2 * i + 1)) for i in range(n)],
                description="Add two whole numbers.")


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_compose_writes_a_peft_adapter_and_report(library, tokenizer, tmp_path, optimizer, ids):
    model = make_model(tokenizer)
    cfg = ComposeConfig(k=4, optimizer=optimizer, budget=6, merge="mixture")
    result, routed = compose(model, tokenizer, few_shot(), library, cfg, description="add numbers",
                             out=tmp_path / "out", keep=True, variant=Variant(population=3))
    # + result and base compared (best-single's result is scored already); the final loss is one of those
    expected = {"uniform": 0 + 2, "best-single": 4 + 1}.get(optimizer, 6 + 2)
    assert routed is not None and result.evaluations == expected
    assert len(result.names) == 4 and result.names[0] == "arithmetic_addition"
    with torch.no_grad():
        ours = routed(**ids).logits
    routed.remove()
    assert torch.allclose(ours, peft_logits(lambda: make_model(tokenizer), tmp_path / "out", ids), atol=1e-5)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["names"] == result.names and (tmp_path / "out" / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("cfg, variant", [
    (ComposeConfig(k=3, optimizer="gradient", budget=4, merge="lorahub"), Variant(per_layer=True)),
    (ComposeConfig(k=3, optimizer="gate", budget=6, merge="mixture", include_base=False), None)])
def test_per_layer_weights_export(library, tokenizer, tmp_path, ids, cfg, variant):
    model = make_model(tokenizer)
    result, routed = compose(model, tokenizer, few_shot(), library, cfg, names=NAMES, out=tmp_path / "out", keep=True,
                             variant=variant)
    assert torch.tensor(result.weights).shape == (4, 3)  # 2 layers x (q, v)
    with torch.no_grad():
        ours = routed(**ids).logits
    routed.remove()
    assert torch.allclose(ours, peft_logits(lambda: make_model(tokenizer), tmp_path / "out", ids), atol=1e-5)


def test_optimizers_improve_on_uniform(library, tokenizer):
    model = make_model(tokenizer)
    uniform, _ = compose(model, tokenizer, few_shot(), library, ComposeConfig(k=6, optimizer="uniform"))
    fitted, _ = compose(model, tokenizer, few_shot(), library, ComposeConfig(k=6, optimizer="cmaes", budget=24))
    assert fitted.loss < uniform.loss


def test_best_single_picks_the_lowest_loss_candidate(library, tokenizer):
    model = make_model(tokenizer)
    chosen, _ = compose(model, tokenizer, few_shot(), library, ComposeConfig(k=4, optimizer="best-single"),
                        description="add numbers")
    assert sorted(chosen.weights) == [0.0, 0.0, 0.0, 1.0]
    alone = {n: compose(model, tokenizer, few_shot(), library, ComposeConfig(optimizer="uniform"), names=[n])[0].loss
             for n in chosen.names}
    assert min(alone, key=alone.get) == chosen.names[chosen.weights.index(1.0)]


def test_options_a_method_does_not_take_are_refused(library, tokenizer, task_file):
    model, task = make_model(tokenizer), load_task(task_file)
    with pytest.raises(ValueError, match="libary"):
        evaluate(model, tokenizer, task, "compose", libary=library)
    with pytest.raises(ValueError, match="compose_cfg"):
        evaluate(model, tokenizer, task, "best-single", library=library, compose_cfg=ComposeConfig(k=2))
    # callers (the CLI, the benchmark) read from the signatures which methods need the library
    assert method_options("compose") == ["library", "compose_cfg", "exclude", "variant"]
    assert method_options("oracle") == [] and method_options("icl") == []


def test_random_candidates_are_seeded(library):
    draw = lambda seed: select_candidates(library, ComposeConfig(k=3, seed=seed),  # noqa: E731
                                          variant=Variant(candidates="random"))
    assert draw(1) == draw(1) and len(draw(1)) == 3


def test_fewer_experts_than_k_uses_all(library):
    assert len(select_candidates(library, ComposeConfig(k=50), description="anything")) == len(library)


def test_bad_inputs_write_nothing(library, tokenizer, tmp_path):
    model = make_model(tokenizer)
    with pytest.raises(ValueError, match="at least 2 examples"):
        compose(model, tokenizer, few_shot(1), library, out=tmp_path / "out", description="x")
    with pytest.raises(LibraryError, match=r"not in .*\['ghost'\]"):
        compose(model, tokenizer, few_shot(), library, names=NAMES + ["ghost"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
    assert not any("lora" in name.lower() or "routed" in type(m).__name__.lower() for name, m in model.named_modules())


@pytest.mark.parametrize("method", ["lorahub", "compose", "uniform", "best-single", "oracle"])
def test_composition_eval_methods_run_and_restore_the_model(library, tokenizer, task_file, method):
    model = make_model(tokenizer)
    task = load_task(task_file)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = {} if method == "oracle" else {"library": library}
    result = evaluate(model, tokenizer, task, method, EvalConfig(n_test=6, shots=5), **options)
    assert result.n == 6 and result.method == method
    # compose's base test (auto picks by the best retrieval score); the others run none, and oracle composes nothing
    expected = {"compose": {"loo", "shots"}, "best-single": {None}, "lorahub": {None}, "uniform": {None}}
    assert result.notes.get("base_test", "no notes") in expected.get(method, {"no notes"})
    assert (method == "oracle") == ("best_score" not in result.notes)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _harmful_expert(library, tokenizer, tmp_path):
    """An expert whose B is scaled up 50x: it wrecks the base model's predictions."""
    from safetensors.torch import load_file, save_file

    src = save_random_lora(make_model(tokenizer), tmp_path / "harmful", seed=13)
    weights = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v * (50 if "lora_B" in k else 1) for k, v in weights.items()}, str(src / "adapter_model.safetensors"))
    library.add(src, name="harmful", description="Add two numbers, badly.")
    return "harmful"


def test_the_base_model_wins_when_every_expert_hurts(library, tokenizer, tmp_path):
    name = _harmful_expert(library, tokenizer, tmp_path)
    model = make_model(tokenizer)
    result, _ = compose(model, tokenizer, few_shot(), library, ComposeConfig(), names=[name], out=tmp_path / "out")
    assert result.base_won and result.weights == [0.0]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["base_won"] is True
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()  # no all-zero adapter
    assert [c["name"] for c in result.candidates] == [name] and result.candidates[0]["gain"] < 0
    assert result.base_loss == pytest.approx(result.loss)  # the result is the base model
    without, _ = compose(model, tokenizer, few_shot(), library, ComposeConfig(include_base=False), names=[name])
    assert not without.base_won and without.weights == [1.0] and without.loss > result.loss


def test_the_compose_method_scores_as_zero_shot_when_the_base_model_won(library, tokenizer, tmp_path):
    harmful = _harmful_expert(library, tokenizer, tmp_path)
    model, task = make_model(tokenizer), few_shot(12)
    cfg = EvalConfig(n_test=6, shots=5)
    composed = evaluate(model, tokenizer, task, "compose", cfg, library=library,
                        exclude=[n for n in library.names() if n != harmful])
    assert composed.notes["base_won"] and composed.accuracy == evaluate(model, tokenizer, task, "zero-shot", cfg).accuracy


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_no_optimizer_returns_worse_than_the_base_model_on_the_shots(library, tokenizer, tmp_path, optimizer):
    names = [_harmful_expert(library, tokenizer, tmp_path), "word_sorting"]
    model = make_model(tokenizer)
    cfg = ComposeConfig(optimizer=optimizer, budget=6, merge="mixture" if optimizer == "gate" else "lorahub")
    result, _ = compose(model, tokenizer, few_shot(), library, cfg, names=names, variant=Variant(population=3))
    routed = RoutedModel(model, load_stack(library, names).modules, "lorahub")
    base_loss = FewShotObjective(routed, tokenizer, few_shot(), few_shot().examples, ComposeConfig(),
                                 Variant()).loss(torch.zeros(2))
    routed.remove()
    assert result.loss <= base_loss + 1e-6


def test_multiple_choice_shots_are_selected_by_the_choice_cross_entropy(library, tokenizer, task_file):
    from lorahub_plus.scoring import choice_scores

    model, task = make_model(tokenizer), load_task(task_file)
    shots = task.examples[:4]
    routed = RoutedModel(model, load_stack(library, NAMES).modules, "lorahub")
    objective = FewShotObjective(routed, tokenizer, task, shots, ComposeConfig(), Variant())
    assert objective.choices
    ours = objective.selection_losses(torch.zeros(1, 3))[0]
    scores, _ = choice_scores(routed, tokenizer, [task.build_prompt(ex) for ex in shots], shots, EvalConfig())
    expected = torch.stack([-torch.log_softmax(s, 0)[ex.choices.index(ex.target)] for s, ex in zip(scores, shots)])
    assert torch.allclose(ours, expected.mean(), atol=1e-5)
    seen = objective.evaluations
    assert torch.allclose(objective.selection_losses(torch.zeros(1, 3), per_example=True)[0], expected, atol=1e-5)
    assert objective.evaluations == seen  # remembered, not scored again
    tokens = FewShotObjective(routed, tokenizer, task, shots, ComposeConfig(), Variant(objective="tokens"))
    assert not tokens.choices and not torch.allclose(tokens.selection_losses(torch.zeros(1, 3))[0], ours)
    routed.remove()


class _Shots:
    """A stand-in objective with fixed per-shot losses: rows are the experts, then the base model."""

    def __init__(self, losses):
        self.losses, self.examples = torch.tensor(losses), [None] * len(losses[0])

    def selection_losses(self, W, per_example=False):
        rows = torch.stack([self.losses[int(w.argmax())] if w.any() else self.losses[-1] for w in W])
        return rows if per_example else rows.mean(1)


def test_leave_one_out_keeps_the_base_model_when_the_pick_only_wins_on_the_shots_it_was_picked_on():
    # each expert is right on one shot only: the best on all 4 shots beats the base model (0.825 < 1), but
    # picked without a shot, another expert is chosen and scores 1.1 on it
    lucky = [[0.0 if i == j else 1.1 for j in range(4)] for i in range(4)] + [[1.0] * 4]
    w = torch.eye(4)[0]
    assert not _base_wins(_Shots(lucky), w, "shots") and _base_wins(_Shots(lucky), w, "loo")
    steady = [[0.5] * 4, [2.0] * 4, [0.9, 0.9, 3.0, 0.9], [1.0] * 4]  # one expert better on every shot
    assert not _base_wins(_Shots(steady), torch.eye(3)[0], "loo")
    with pytest.raises(ValueError, match="base_test"):  # checked by compose before any work: it spans both objects
        compose(None, None, few_shot(), None, ComposeConfig(optimizer="cmaes"), variant=Variant(base_test="loo"))


def test_leave_one_out_keeps_the_base_model_when_the_gain_is_within_one_standard_error():
    # one shot won big, four lost a little: a positive mean gain (0.12) that one standard error (0.22) covers
    spiky = [[0.0, 1.1, 1.1, 1.1, 1.1], [1.0] * 5]
    w = torch.eye(1)[0]
    assert not _base_wins(_Shots(spiky), w, "loo", se=0.0) and _base_wins(_Shots(spiky), w, "loo", se=1.0)
    assert not _base_wins(_Shots([[0.5] * 5, [1.0] * 5]), w, "loo", se=1.0)  # the same gain on every shot
    assert Variant().loo_se == 1.0
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="loo_se"):
            Variant(loo_se=bad)


def test_pick_takes_the_lowest_mean_loss_and_a_failed_expert_never():
    losses = torch.tensor([[0.50, 0.90, 0.40, 0.80], [0.60, 0.80, 0.50, 0.80], [float("nan")] * 4])
    assert pick(losses) == 0 and pick(losses[1:]) == 0


class _Calibrated:
    """A library stand-in holding one calibration entry."""

    def __init__(self, close):
        self.close = close

    def calibration(self, key):
        return None if self.close is None else {"value": self.close}


def test_auto_base_test_leaves_shots_out_only_when_no_candidate_is_close():
    cfg, lib = ComposeConfig(), _Calibrated(0.6)
    assert Variant().base_test == "auto"
    assert _base_test(cfg, 0.59, lib) == "loo" and _base_test(cfg, 0.6, lib) == "shots"
    assert _base_test(cfg, 0.99, _Calibrated(None)) == "loo"  # an uncalibrated library: every candidate is far
    assert _base_test(cfg, None, lib) == "shots"  # given or drawn candidates carry no retrieval score
    assert _base_test(ComposeConfig(optimizer="cmaes"), 0.0, lib) == "shots"  # loo tests one expert
    assert _base_test(cfg, 0.99, lib, Variant(base_test="loo")) == "loo"


def test_compose_tests_against_the_base_model_as_the_library_calibration_says(library, tokenizer):
    model = make_model(tokenizer)
    for close, expected in ((1.0, "loo"), (-1.0, "shots")):
        library.set_calibration("close", close, {"by": "a test"})
        result, _ = compose(model, tokenizer, few_shot(), library, ComposeConfig(k=3), description="add numbers")
        assert result.base_test == expected
    result, _ = compose(model, tokenizer, few_shot(), library, ComposeConfig(k=3, include_base=False),
                        description="add numbers")
    assert result.base_test is None


def test_leave_one_out_reads_the_losses_best_single_already_has(library, tokenizer):
    cfg = ComposeConfig(k=4)
    result, _ = compose(make_model(tokenizer), tokenizer, few_shot(), library, cfg, description="add numbers",
                        variant=Variant(population=3, base_test="loo"))
    assert result.evaluations == 4 + 1  # each candidate once and the base model; nothing scored twice
    assert result.base_test == "loo"


def test_excluded_experts_are_never_candidates(library):
    cfg = ComposeConfig(k=6)
    kept = select_candidates(library, cfg, "add two numbers", ["What is 2 plus 2?"], exclude=["arithmetic_addition"])
    assert len(kept) == 5 and "arithmetic_addition" not in [n for n, _ in kept]
    drawn = select_candidates(library, ComposeConfig(k=6), exclude=["word_sorting"],
                              variant=Variant(candidates="random"))
    assert "word_sorting" not in [n for n, _ in drawn]


def test_the_multitask_lora_joins_the_candidates_when_the_variant_asks(library, tokenizer, tmp_path):
    from lorahub_plus.library.train import MULTITASK

    folder = save_random_lora(make_model(tokenizer), tmp_path / "src" / MULTITASK, 7)
    library.add(folder, name=MULTITASK, description="A mix of many unrelated tasks.")
    cfg, query = ComposeConfig(k=2), ("add two numbers", ["What is 2 plus 2?"])
    plain = [n for n, _ in select_candidates(library, cfg, *query)]
    both = select_candidates(library, cfg, *query, variant=Variant(multitask=True))
    assert MULTITASK not in plain and [n for n, _ in both] == plain + [MULTITASK]
    assert both[-1][1] is not None  # its retrieval score is kept
    assert MULTITASK not in [n for n, _ in select_candidates(library, cfg, *query, exclude=[MULTITASK],
                                                             variant=Variant(multitask=True))]


def test_gate_combiner_fits_the_shots_and_keeps_top_k_softmax_means(library, tokenizer):
    model = make_model(tokenizer)
    cfg = ComposeConfig(k=6, optimizer="gate", budget=12, merge="mixture", include_base=False)
    result, _ = compose(model, tokenizer, few_shot(), library, cfg)
    w = torch.tensor(result.weights)
    assert w.shape == (4, 6) and (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(4), atol=1e-5)
    assert result.curve[-1][1] < result.curve[0][1] and result.evaluations >= 12
    with pytest.raises(ValueError, match="merge='mixture'"):
        ComposeConfig(optimizer="gate")


def test_compose_config_holds_only_what_a_user_sets():
    # issue 34: the settings benchmarks compare live in `Variant`, not on the product's surface
    from dataclasses import fields

    assert len(fields(ComposeConfig)) <= 9
    with pytest.raises(TypeError):
        ComposeConfig(population=3)
