"""The hypernetwork (Text-to-LoRA): shapes and init, both objectives, exact resume, the library round trip and
its refusals, synthesis into a PEFT folder and the library, the compose fallback, and task selection."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_model, save_random_lora
from lorahub_plus.errors import LibraryError, OutputPathError
from lorahub_plus.hypernet.network import (HypernetConfig, HyperLoRA, embedding_dim, load_hypernet, task_vector, task_vectors)
from lorahub_plus.hypernet.training import (HypernetTrainConfig, build_hypernet, family, select_tasks, split_validation, training_tasks)
from lorahub_plus.library.store import Library

TASKS = {
    "adding__small": ("Add two small numbers.", lambda a, b: (f"What is {a} plus {b}?", str(a + b))),
    "subtracting__small": ("Subtract one number from another.", lambda a, b: (f"What is {a} minus {b}?", str(a - b))),
    "repeating__words": ("Repeat the word you are given.", lambda a, b: (f"Say {a} {b} again.", f"{a} {b}")),
    "held__out": ("Multiply two numbers.", lambda a, b: (f"What is {a} times {b}?", str(a * b))),
}
CFG = HypernetConfig(rank=4, latent=16, head_in=16)


@pytest.fixture
def setup(tmp_path, tokenizer, embedder):
    """A data folder of 4 tiny tasks and a library of 3 random experts whose cards name their source tasks."""
    data = tmp_path / "data"
    data.mkdir()
    for name, (description, make) in TASKS.items():
        examples = [dict(zip(("input", "target"), make(a, b))) for a in range(6) for b in range(6)]
        (data / f"{name}.json").write_text(json.dumps({"name": name.replace("__", ":"), "description": description,
                                                       "keywords": ["math"], "examples": examples}))
    model = make_model(tokenizer)
    library = Library.create(tmp_path / "lib", model, embedder=embedder)
    for seed, name in enumerate(n for n in TASKS if n != "held__out"):
        folder = save_random_lora(model, tmp_path / "src" / name, seed)
        (folder / "card.json").write_text(json.dumps({"name": name, "description": TASKS[name][0],
                                                      "source_task": name.replace("__", ":")}))
        library.add(folder)
    return library, data, model


def test_zero_head_gives_the_offsets_and_shapes_follow_the_modules(setup):
    library, _, _ = setup
    modules = {m: tuple(s) for m, s in library.base_shapes.items() if m.endswith(("q_proj", "v_proj"))}
    offsets = {m: (torch.randn(4, n_in), torch.randn(n_out, 4)) for m, (n_in, n_out) in modules.items()}
    net = HyperLoRA(CFG, 8, modules, offsets, {m: (1.0, 1.0) for m in modules}).eval()
    lora = net(torch.randn(3, 16))
    for m, (n_in, n_out) in modules.items():
        A, B = lora[m]
        assert A.shape == (3, 4, n_in) and B.shape == (3, n_out, 4)
        assert torch.equal(A[1], offsets[m][0]) and torch.equal(B[2], offsets[m][1])


def test_task_vector_puts_description_and_examples_side_by_side(embedder):
    v = task_vector(embedder, "Add numbers.")
    w = task_vector(embedder, None, [("1 + 1", "2"), ("2 + 2", "4")])
    dim = embedding_dim(embedder)
    assert v.shape == (2 * dim,) and v[dim:].abs().sum() == 0 and w[:dim].abs().sum() == 0
    assert abs(float(w[dim:].norm()) - 1) < 1e-5
    with pytest.raises(ValueError, match="description"):
        task_vector(embedder)


def test_task_vectors_batch_matches_one_request_at_a_time(embedder):
    requests = [("Add numbers.", None), (None, [("1 + 1", "2"), ("2 + 2", "4")]), ("Say it.", [("hi", "hi")]),
                (None, [("what is 3 + 4?", "")])]
    batched = task_vectors(embedder, requests)
    single = torch.stack([task_vector(embedder, d, e) for d, e in requests])
    assert batched.shape == (4, 2 * embedding_dim(embedder)) and torch.allclose(batched, single, atol=1e-5)
    with pytest.raises(ValueError, match="description"):
        task_vectors(embedder, [("Add.", None), ("", [])])


def test_reconstruction_learns_and_the_saved_hypernet_round_trips(setup, tokenizer, tmp_path):
    library, data, model = setup
    cfg = HypernetTrainConfig(objective="reconstruction", recon_steps=200, recon_lr=1e-2, tasks_per_step=3)
    folder = build_hypernet(library, model, tokenizer, data, {"held__out"}, tmp_path / "work", CFG, cfg, progress=False)
    meta = json.loads((folder / "hypernet.json").read_text())
    losses = meta["losses"]["reconstruction"]
    assert len(losses) == 200 and sum(losses[-10:]) < 0.7 * sum(losses[:10])
    assert meta["metrics"]["reconstruction_error"] < 1.0 and meta["held_out"] == ["held__out"]
    assert "held__out" not in meta["training_tasks"] and (folder / "loss.png").is_file()
    net, _ = load_hypernet(library)
    vector = task_vector(library.embedder, "Add two small numbers.")[None]
    fresh = {k: v.float() for k, v in load_file(str(folder / "hypernet.safetensors")).items()}
    assert all(torch.equal(net.state_dict()[k], fresh[k]) for k in fresh)
    assert set(net(vector)) == {m for m in library.base_shapes if m.endswith(("q_proj", "v_proj"))}
    assert library.verify() == [] and "hypernet" not in library.names()


def test_sft_moves_the_hypernet_only(setup, tokenizer, tmp_path):
    library, data, model = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = build_hypernet(library, model, tokenizer, data, {"held__out"}, tmp_path / "a", CFG, HypernetTrainConfig(
        objective="sft", sft_steps=4, tasks_per_step=2, max_length=32, sft_lr=1e-2), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base model stays frozen
    assert all(p.requires_grad for p in model.parameters())  # and is given back trainable, as it came
    meta = json.loads((folder / "hypernet.json").read_text())
    assert list(meta["losses"]) == ["sft"] and len(meta["losses"]["sft"]) == 4
    state = load_file(str(folder / "hypernet.safetensors"))
    assert any(state[k].abs().sum() > 0 for k in state if k.startswith("heads."))  # the zero heads moved


def test_validation_holds_out_whole_families_and_the_best_checkpoint_is_saved(setup, tokenizer, tmp_path, monkeypatch):
    library, data, model = setup
    cfg = HypernetTrainConfig(objective="sft", sft_steps=6, tasks_per_step=2, max_length=32, sft_lr=6e-2,
                              checkpoint_every=2, validation=1)
    train, validating = training_tasks(data, {"held__out"}, cfg, library.embedder)
    assert len(validating) == 1 and not {family(n) for n in train} & {family(n) for n in validating}
    assert (train, validating) == split_validation({**train, **validating}, 1, 0)  # the same draw every time
    with pytest.raises(ValueError, match="leave a family"):
        split_validation(train, len(train), 0)
    folder = build_hypernet(library, model, tokenizer, data, {"held__out"}, tmp_path / "w", CFG, cfg, progress=False)
    meta = json.loads((folder / "hypernet.json").read_text())
    val = meta["validation"]
    assert val["tasks"] == list(validating) and set(meta["training_tasks"]) == set(train)
    assert [step for step, _ in val["curve"]["sft"]] == [0, 2, 4, 6] and val["base_model_loss"] > 0
    assert val["best"]["loss"] == min(loss for _, loss in val["curve"]["sft"]) and val["best"]["step"] < 6  # lr overshoots
    best = load_file(str(tmp_path / "w" / "best.safetensors"))
    saved = load_file(str(folder / "hypernet.safetensors"))
    assert all(torch.equal(best[k].half(), saved[k]) for k in saved)  # the lowest checkpoint, not the last step
    import lorahub_plus.hypernet.training as hypertrain

    monkeypatch.setattr(hypertrain, "base_validation_loss", lambda *a: pytest.fail("remeasured on resume"))
    again = build_hypernet(library, model, tokenizer, data, {"held__out"}, tmp_path / "w", CFG, cfg, progress=False)
    assert json.loads((again / "hypernet.json").read_text())["validation"]["base_model_loss"] == val["base_model_loss"]


def test_resume_from_a_mid_run_checkpoint_gives_the_same_weights(setup, tokenizer, tmp_path):
    from lorahub_plus.hypernet.training import run_phases

    library, data, model = setup
    cfg = HypernetTrainConfig(objective="reconstruction", recon_steps=6, checkpoint_every=3)
    modules = {m: tuple(s) for m, s in library.base_shapes.items() if m.endswith(("q_proj", "v_proj"))}

    def fresh():
        torch.manual_seed(0)
        return HyperLoRA(CFG, 8, modules)

    def phases(net, crash_at=None):
        def step(rng):
            x = torch.tensor([rng.random() for _ in range(16)])[None]
            if crash_at is not None and rng.random() >= 0 and len(calls) == crash_at:
                raise KeyboardInterrupt
            calls.append(1)
            return sum(z.square().mean() for z in net.z(x).values()) + net.task_encoder[0].weight.sum().square()
        return {"reconstruction": (6, 1e-2, step)}

    calls = []
    a = fresh()
    run_phases(a, phases(a), cfg, tmp_path / "a", "key", progress=False)
    calls = []
    b = fresh()
    with pytest.raises(KeyboardInterrupt):
        run_phases(b, phases(b, crash_at=4), cfg, tmp_path / "b", "key", progress=False)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 3
    calls = []
    c = fresh()  # a new process: fresh weights, everything else from the checkpoint
    run_phases(c, phases(c), cfg, tmp_path / "b", "key", progress=False)
    assert len(calls) == 3
    assert all(torch.allclose(a.state_dict()[k], v, atol=1e-6) for k, v in c.state_dict().items())
    with pytest.raises(LibraryError, match="another run"):
        run_phases(fresh(), phases(fresh()), cfg, tmp_path / "b", "other key", progress=False)


def test_a_hypernet_for_another_model_or_with_bad_weights_is_refused(setup, tokenizer, tmp_path):
    library, data, model = setup
    folder = build_hypernet(library, model, tokenizer, data, {"held__out"}, tmp_path / "w", CFG,
                            HypernetTrainConfig(objective="reconstruction", recon_steps=2), progress=False)
    meta = json.loads((folder / "hypernet.json").read_text())
    (folder / "hypernet.json").write_text(json.dumps({**meta, "fingerprint": "other"}))
    with pytest.raises(LibraryError, match="`fingerprint`"):
        load_hypernet(library)
    (folder / "hypernet.json").write_text(json.dumps({**meta, "config": {**meta["config"], "rank": 5}}))
    with pytest.raises(LibraryError, match="tensors do not match"):
        load_hypernet(library)
    (folder / "hypernet.json").write_text(json.dumps(meta))
    state = load_file(str(folder / "hypernet.safetensors"))
    key = next(k for k in state if k.startswith("heads."))
    save_file({**state, key: torch.full_like(state[key], float("nan"))}, str(folder / "hypernet.safetensors"))
    with pytest.raises(LibraryError, match="NaN"):
        load_hypernet(library)


def _add_mix(library, model, tmp_path, tasks: list[str]):
    """A multitask-like expert: no source task, its training tasks in its card's metrics."""
    folder = save_random_lora(model, tmp_path / "src" / "mix", 9)
    (folder / "card.json").write_text(json.dumps({"name": "mix", "description": "A mix.",
                                                  "metrics": {"training_tasks": tasks}}))
    library.add(folder)


def test_an_anchor_is_what_a_zero_head_gives_and_one_trained_on_held_out_tasks_is_refused(setup, tokenizer, tmp_path):
    from lorahub_plus.library.stack import load_stack

    library, data, model = setup
    _add_mix(library, model, tmp_path, ["adding:small", "held:out"])
    cfg = HypernetTrainConfig(objective="sft", sft_steps=1, tasks_per_step=2, max_length=32, anchor="mix")
    with pytest.raises(LibraryError, match=r"\['mix'\] were trained on held-out tasks"):
        build_hypernet(library, model, tokenizer, data, {"held__out"}, tmp_path / "a", CFG, cfg, progress=False)
    library.remove("mix")
    _add_mix(library, model, tmp_path, ["adding:small"])
    build_hypernet(library, model, tokenizer, data, {"held__out"}, tmp_path / "b", CFG, cfg, progress=False)
    net, meta = load_hypernet(library)
    for head in net.heads.values():
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    lora, mix = net(task_vector(library.embedder, "Anything.")[None]), load_stack(library, ["mix"]).modules
    assert meta["train_config"]["anchor"] == "mix" and set(lora) == set(mix)
    for m, (A, B) in lora.items():  # stored in half precision
        assert torch.allclose(A[0], mix[m][0][0], atol=1e-2) and torch.allclose(B[0], mix[m][1][0], atol=1e-2)


@pytest.fixture
def trained(setup, tokenizer, tmp_path):
    library, data, model = setup
    build_hypernet(library, model, tokenizer, data, {"held__out"}, tmp_path / "w", CFG,
                   HypernetTrainConfig(objective="reconstruction", recon_steps=5), progress=False)
    return library, data, model


def test_synthesize_writes_a_peft_folder_marked_synthesized_and_adds_it_to_the_library(trained, tmp_path):
    from peft import PeftModel

    from lorahub_plus.hypernet.synthesize import synthesize

    library, _, model = trained
    card = synthesize("Multiply two numbers.", [("2 times 3", "6")], tmp_path / "out", library,
                      add_to_library="multiplying")
    assert card.origin["synthesized"] and card.origin["description"] == "Multiply two numbers."
    assert card.origin["hypernet"]["sha256"] and card.name == "multiplying"
    written = json.loads((tmp_path / "out" / "card.json").read_text())
    assert written["origin"]["examples"] == [["2 times 3", "6"]]
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "out"))
    assert sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n) == len(card.modules)
    peft_model.unload()
    assert "multiplying" in library.names() and library.verify() == []
    assert library.search("multiply numbers", 1)[0].name == "multiplying"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputPathError):
        synthesize("Add.", None, tmp_path / "mine", library, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_compose_fallback_adds_a_synthesized_candidate_and_says_so(trained, tokenizer, task_file):
    from lorahub_plus.compose.config import ComposeConfig
    from lorahub_plus.compose.composer import compose
    from lorahub_plus.hypernet.synthesize import set_fallback_threshold
    from lorahub_plus.tasks import load_task

    library, _, model = trained
    task = load_task(task_file)
    few = type(task)(**{**task.__dict__, "examples": task.examples[:4]})
    result, _ = compose(model, tokenizer, few, library, ComposeConfig(k=2, fallback="always"), description="add")
    assert result.names[-1] == "synthesized" and result.fallback["synthesized"] and len(result.weights) == 3
    result, _ = compose(model, tokenizer, few, library, ComposeConfig(k=2, fallback="auto"), description="add")
    assert result.fallback == {"best_score": result.fallback["best_score"], "threshold": None, "synthesized": False}
    set_fallback_threshold(library, 2.0, {"by": "a test"})  # above any cosine: every composition falls back
    result, _ = compose(model, tokenizer, few, library, ComposeConfig(k=2), description="add")
    assert result.fallback["synthesized"] and result.fallback["threshold"] == 2.0
    entry = library.calibration("compose_fallback")  # stored with the library, not in the hypernetwork's files
    assert entry["value"] == 2.0 and entry["evidence"] == {"by": "a test"}
    library.set_calibration("compose_fallback", 2.0, {"by": "a test"}, hypernet={"sha256": "another hypernetwork"})
    result, _ = compose(model, tokenizer, few, library, ComposeConfig(k=2), description="add")
    assert not result.fallback["synthesized"]  # calibrated with another hypernetwork: not used


def test_routing_falls_back_to_an_adapter_synthesized_from_a_far_input(trained, tokenizer):
    """Below the route threshold an `auto` row gets its own synthesized adapter in the same batch; a row that
    names an expert keeps it; `never` ignores the threshold; the model comes back unchanged."""
    from lorahub_plus.routing.routers import Router, RouterConfig
    from lorahub_plus.hypernet.synthesize import generate_lora, set_fallback_threshold

    library, _, model = trained
    inputs, adapters = ["What is 3 times 4?", "What is 2 plus 2?"], [None, "adding__small"]
    plain = Router(library, model, tokenizer, RouterConfig(k=2))
    assert plain.rows(inputs, adapters).adapters is None
    model = plain.remove()
    set_fallback_threshold(library, 2.0, {"by": "a test"}, kind="route")  # above any cosine: every auto row
    router = Router(library, model, tokenizer, RouterConfig(k=2))
    rows = router.rows(inputs, adapters)
    lora = generate_lora(library, None, [(inputs[0], "")])
    A, B = rows.adapters[next(iter(lora))]
    assert torch.allclose(A[0], next(iter(lora.values()))[0], atol=1e-6)
    assert A[1].abs().sum() == 0 and B[1].abs().sum() == 0
    both = router.rows(inputs).adapters  # two far rows: one embedding call, one hypernetwork forward
    for row, text in enumerate(inputs):
        for m, (A, B) in generate_lora(library, None, [(text, "")]).items():
            assert torch.allclose(both[m][0][row], A, atol=1e-6) and torch.allclose(both[m][1][row], B, atol=1e-6)
    assert rows.weights[0].abs().sum() == 0 and rows.weights[1, router.names.index("adding__small")] == 1
    assert router.explain(inputs[:1]) == [[("synthesized", 1.0)]]
    batch = tokenizer(inputs, return_tensors="pt", padding=True)
    with torch.no_grad():
        routed, base = router.model(**batch, routes=rows).logits, model(**batch).logits
    assert not torch.allclose(routed[0], base[0])
    assert router.generate(inputs, 3, adapters=adapters)[0] == router.generate(inputs[:1], 3)[0]
    with pytest.raises(ValueError, match="Rows.adapters"):
        router.model(**batch, routes=type(rows)(rows.weights, None, {k: v for k, v in list(rows.adapters.items())[1:]}))
    never = Router(library, router.remove(), tokenizer, RouterConfig(k=2, fallback="never"))
    assert never.rows(inputs).adapters is None
    assert not any(type(m).__name__ == "RoutedLoRALinear" for m in never.remove().modules())


def test_hypernet_methods_evaluate_and_give_the_model_back(trained, tokenizer, task_file):
    from lorahub_plus.scoring import EvalConfig
    from lorahub_plus.evaluation import evaluate
    from lorahub_plus.tasks import load_task

    library, _, model = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method, options in (("hypernet", {}), ("hypernet", {"description": "Sum two numbers."}),
                            ("hypernet-fewshot", {})):
        result = evaluate(model, tokenizer, load_task(task_file), method, EvalConfig(n_test=4, shots=3), library=library,
                          **options)
        assert result.n == 4 and 0 <= result.accuracy <= 1
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_tasks_leave_out_held_out_families_and_near_duplicates(setup):
    library, data, _ = setup
    assert family("natural_instructions__subtask013_mctaco_answer") == "natural_instructions:mctaco"
    assert family("arithmetic__3_digit_subtraction") == "arithmetic"
    (data / "adding__large.json").write_text((data / "adding__small.json").read_text())
    (data / "copy.json").write_text((data / "held__out.json").read_text())  # same description: a near-duplicate
    names = select_tasks(data, {"adding__small", "held__out"}, per_family=5, seed=0, embedder=library.embedder)
    assert list(names) == ["repeating__words", "subtracting__small"]
    assert len(select_tasks(data, set(), per_family=1, seed=0, embedder=library.embedder)) == 5


def test_multitask_trains_one_lora_on_a_mix_and_records_its_tasks(setup, tokenizer, tmp_path):
    from lorahub_plus.tasks import load_task
    from lorahub_plus.library.train import TrainConfig, train_multitask

    library, data, model = setup
    tasks = [load_task(data / f"{n}.json") for n in ("adding__small", "repeating__words")]
    card = train_multitask(tasks, tmp_path / "multitask", TrainConfig(rank=4, epochs=1, batch_size=4, n_test=10),
                           per_task=4, model=model, tokenizer=tokenizer, progress=False)
    assert card.metrics["n_train"] == 8 and card.metrics["training_tasks"] == ["adding:small", "repeating:words"]
    assert library.add(tmp_path / "multitask").name == "multitask" and library.verify() == []


def test_cli_synthesize_prints_the_card_and_refuses_an_empty_request(trained, tmp_path, capsys):
    from lorahub_plus.cli import main

    library, _, _ = trained
    main(["synthesize", "--library", str(library.path), "--description", "Add two numbers.", "--out",
          str(tmp_path / "o"), "--json"])
    card = json.loads(capsys.readouterr().out)
    assert card["origin"]["synthesized"] and (tmp_path / "o" / "adapter_model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["synthesize", "--library", str(library.path), "--out", str(tmp_path / "p")])
    assert "--description" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_synthesize_checks_the_library_name_before_writing_anything(trained, tmp_path):
    from lorahub_plus.hypernet.synthesize import synthesize

    library, _, _ = trained
    before = sorted(p.name for p in library.path.iterdir())
    for name in (str(tmp_path / "evil"), "../evil", "bad name", "adding__small"):
        with pytest.raises(LibraryError, match="`name`|exists already|no expert"):
            synthesize("Add two numbers.", None, tmp_path / "out", library, add_to_library=name)
        assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()
    assert sorted(p.name for p in library.path.iterdir()) == before
    with pytest.raises(ValueError, match="`description` is empty"):
        synthesize("   ", None, tmp_path / "out", library)
    assert synthesize("", [("2 times 3", "6")], tmp_path / "ex", library).description == "synthesized from 1 examples"
    card = synthesize("Add two numbers.", None, None, library, add_to_library="adding__small", replace=True)
    assert library.card("adding__small").origin["synthesized"] and card.name == "adding__small"


def test_a_hypernet_for_another_embedder_is_refused(trained):
    library, _, _ = trained
    folder = library.path / "hypernet"
    meta = json.loads((folder / "hypernet.json").read_text())
    (folder / "hypernet.json").write_text(json.dumps({**meta, "emb_dim": 10}))
    with pytest.raises(LibraryError, match="`emb_dim` is 10"):
        load_hypernet(library)


def test_a_work_folder_holding_files_of_the_user_is_refused(setup, tokenizer, tmp_path):
    library, data, model = setup
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "thesis.tex").write_text("mine")
    with pytest.raises(OutputPathError, match="thesis.tex"):
        build_hypernet(library, model, tokenizer, data, {"held__out"}, tmp_path / "w", CFG,
                       HypernetTrainConfig(objective="reconstruction", recon_steps=2), progress=False)
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["thesis.tex"]


def test_synthesize_and_hypernet_fewshot_name_what_they_need(trained, tokenizer, task_file):
    from lorahub_plus.scoring import EvalConfig
    from lorahub_plus.evaluation import evaluate
    from lorahub_plus.hypernet.synthesize import synthesize
    from lorahub_plus.tasks import load_task

    library, _, model = trained
    with pytest.raises(ValueError, match="pairs of strings"):
        synthesize(None, [{"input": "2 times 3", "target": "6"}], None, library, add_to_library="x")
    with pytest.raises(ValueError, match="shots"):
        evaluate(model, tokenizer, load_task(task_file), "hypernet-fewshot", EvalConfig(shots=0, n_test=2),
                 library=library)
