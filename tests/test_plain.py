"""Ordinary input (issue 33): the prompt policy, compose's answer when the base model wins, eval's predictions,
the checks `library add` shares with `verify`, and the small ones."""
import json

import pytest

from conftest import make_model, save_random_lora
from lorahub_plus.cli import NO_ADAPTER, main
from lorahub_plus.errors import IncompatibleAdapterError
from lorahub_plus.prompts import as_chat, chat_frame, chat_prompt, for_model
from lorahub_plus.tasks import Example, load_task

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture
def chat_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def test_plain_examples_take_the_chat_template_and_task_files_keep_their_prefixes(chat_tokenizer, task_file, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text('{"input": "2 plus 3?", "target": "5"}\n{"input": "4 plus 1?", "target": "5"}\n')
    plain = for_model(load_task(few), chat_tokenizer)
    shot, query = plain.examples
    expected = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": shot.input}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": query.input}], tokenize=False, add_generation_prompt=True)
    assert plain.build_prompt(query, [shot]) == expected and not plain.plain
    assert chat_prompt(chat_tokenizer, "hi") == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    framed = load_task(task_file)
    assert for_model(framed, chat_tokenizer) is framed  # a BIG-bench file keeps its `\nQ: ... \nA: `


def test_without_a_chat_template_plain_input_keeps_the_default_framing(tokenizer):
    assert chat_frame(tokenizer) is None
    assert chat_prompt(tokenizer, "What is 2 plus 2?") == "Q: What is 2 plus 2?\nA: "


def test_a_template_that_cannot_render_a_chat_falls_back(chat_tokenizer):
    chat_tokenizer.chat_template = "{{ raise_exception('no assistant turns') }}"
    assert chat_frame(chat_tokenizer) is None


def test_as_chat_asks_a_multiple_choice_task_as_free_text_or_with_its_choices(chat_tokenizer, task_file):
    task = load_task(task_file)
    free, listed = as_chat(task, chat_tokenizer, choices=False), as_chat(task, chat_tokenizer)
    ex = task.examples[7]
    assert free.kind == "generative" and free.build_prompt(ex) == chat_prompt(chat_tokenizer, ex.input)
    assert listed.kind == "multiple_choice" and "choice: banana" in listed.build_prompt(ex)


def test_training_with_chat_adds_the_chat_copy_of_every_example(chat_tokenizer, task_file, monkeypatch):
    from lorahub_plus.library import train

    seen = []
    monkeypatch.setattr(train, "fit_lora", lambda model, tok, pairs, cfg, desc, progress: seen.extend(pairs))
    task = load_task(task_file)
    train.train_lora(None, chat_tokenizer, task, task.examples[:4], train.TrainConfig(chat="input"))
    prompts = [t.build_prompt(ex) for t, ex in seen]
    assert len(seen) == 8 and prompts[4] == chat_prompt(chat_tokenizer, task.examples[0].input)
    with pytest.raises(ValueError, match="chat"):
        train.TrainConfig(chat="yes")


def test_router_answers_a_plain_input_in_the_chat_template(library, chat_tokenizer, monkeypatch):
    from lorahub_plus.routing.routers import Router

    model = make_model(chat_tokenizer)
    router = Router(library, model, chat_tokenizer)
    seen = []
    real = chat_tokenizer.__class__.__call__
    monkeypatch.setattr(chat_tokenizer.__class__, "__call__", lambda self, texts, **kw: seen.append(texts) or real(
        self, texts, **kw))
    router.generate(["What is 2 plus 2?"], max_new_tokens=2)
    router.remove()
    assert seen[0] == [chat_prompt(chat_tokenizer, "What is 2 plus 2?")]


# -- compose: "no adapter" ----------------------------------------------------------------------------
def test_compose_that_keeps_the_base_model_writes_no_adapter_and_exits_3(library, tokenizer, tmp_path, capsys,
                                                                         saved_base):
    from safetensors.torch import load_file, save_file

    src = save_random_lora(make_model(tokenizer), tmp_path / "harmful", seed=13)
    weights = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v * (50 if "lora_B" in k else 1) for k, v in weights.items()}, str(src / "adapter_model.safetensors"))
    library.add(src, name="harmful", description="Add two numbers, badly.")
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"input": f"What is {a} plus 2?", "target": str(a + 2)}) + "\n" for a in range(5)))
    with pytest.raises(SystemExit) as exit_:
        main(["compose", "--examples", str(few), "--candidates", "harmful", "--out", str(tmp_path / "out"),
              "--library", str(library.path), "--base-model", saved_base])
    text = capsys.readouterr().out
    assert exit_.value.code == NO_ADAPTER and "no adapter" in text and "harmful" in text
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.json", "loss.png"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["base_won"] and f"loss {report['loss']:.4f}" in text  # the printed loss is the recorded one
    assert text.startswith("5 shots, 1 candidates")  # the user's own shot count


def test_compose_refuses_candidates_that_name_no_expert(library, tmp_path, capsys):
    few = tmp_path / "few.jsonl"
    few.write_text('{"input": "a", "target": "b"}\n{"input": "c", "target": "d"}\n')
    with pytest.raises(SystemExit):
        main(["compose", "--examples", str(few), "--candidates", ",", "--out", str(tmp_path / "o"),
              "--library", str(library.path)])
    assert "--candidates" in capsys.readouterr().err and not (tmp_path / "o").exists()


# -- eval shows its work ------------------------------------------------------------------------------
def test_eval_prints_predictions_and_says_when_the_test_set_is_smaller(saved_base, tmp_path, capsys):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"input": f"What is {a} plus 2?", "target": str(a + 2)}) + "\n" for a in range(8)))
    main(["eval", "--task", str(few), "--n-test", "100", "--show", "2", "--base-model", saved_base])
    text = capsys.readouterr().out
    assert "only 3 test examples of the 100 asked for: the task has 8 examples, 5 kept out" in text
    assert text.count("expected ") + text.count("ok ") == 2
    result = json.loads(main(["eval", "--task", str(few), "--n-test", "100", "--json", "--base-model", saved_base])
                        or capsys.readouterr().out)
    assert result["n_asked"] == 100 and len(result["predictions"]) == result["n"]
    assert {"input", "prediction", "targets", "correct"} == set(result["predictions"][0])


def test_zero_shot_on_a_one_example_file_needs_no_shots_flag(saved_base, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text('{"input": "What is 1 plus 2?", "target": "3"}\n')
    main(["eval", "--task", str(one), "--json", "--base-model", saved_base])
    assert json.loads(capsys.readouterr().out)["n"] == 1


# -- add checks what verify checks --------------------------------------------------------------------
def _edit_config(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    return folder


def test_add_refuses_another_base_model_unless_told_and_then_records_it(library, tokenizer, tmp_path, capsys):
    src = _edit_config(save_random_lora(make_model(tokenizer), tmp_path / "llama", seed=5),
                       base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    with pytest.raises(IncompatibleAdapterError, match="meta-llama/Llama-2-7b-hf"):
        library.add(src, name="llama", description="Another model's adapter.")
    assert "llama" not in library.names()
    main(["library", "add", str(src), "--name", "llama", "--description", "Another model's adapter.",
          "--base-model-mismatch", "ok", "--library", str(library.path)])
    card = library.card("llama")
    assert card.origin["base_model_mismatch"] == "meta-llama/Llama-2-7b-hf" and library.verify() == []


def test_add_refuses_target_modules_that_do_not_name_the_weights(library, tokenizer, tmp_path):
    src = _edit_config(save_random_lora(make_model(tokenizer), tmp_path / "kv", seed=6),
                       target_modules=["k_proj", "o_proj"])
    with pytest.raises(IncompatibleAdapterError, match="target_modules.*peft would load none"):
        library.add(src, name="kv", description="Mislabelled.")
    regex = _edit_config(save_random_lora(make_model(tokenizer), tmp_path / "re", seed=7),
                         target_modules=r".*\.(q_proj|v_proj)")
    assert library.add(regex, name="regex", description="Targets by regex.").name == "regex"


def test_add_refuses_an_empty_name(library, tokenizer, tmp_path, capsys):
    src = save_random_lora(make_model(tokenizer), tmp_path / "named", seed=8)
    with pytest.raises(SystemExit):
        main(["library", "add", str(src), "--name", "", "--description", "x", "--library", str(library.path)])
    assert "`name`" in capsys.readouterr().err and "named" not in library.names()


def test_init_on_a_file_is_named(tmp_path, capsys, saved_base):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SystemExit):
        main(["library", "init", "--library", str(tmp_path / "afile"), "--base-model", saved_base])
    err = capsys.readouterr().err
    assert "is a file" in err and "Errno" not in err and (tmp_path / "afile").read_text() == "mine"


def test_a_jsonl_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"input": "x", "target": "y"}\n')
    assert load_task(path).examples == [Example("x", "y")]


def test_route_prints_long_inputs_clipped_and_control_characters_escaped():
    from lorahub_plus.cli import _clip

    assert _clip("a" * 50_000, 100) == "a" * 97 + "..." and _clip("bell\x07\x1b[2J") == "bell\\x07\\x1b[2J"


def test_a_hub_id_without_network_fails_once_with_a_clear_message(monkeypatch):
    from huggingface_hub import constants

    from lorahub_plus.models import load_base_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE"):
        load_base_model("nobody/no-such-model-xyz")


def test_route_answers_a_file_in_its_order_batching_by_length(library, saved_base, tmp_path, capsys):
    inputs = ["a much longer input about adding two whole numbers together " * 3, "add 2 and 3", "sort words"]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"input": x}) + "\n" for x in inputs))
    main(["route", "--inputs", str(path), "--max-new-tokens", "2", "--json", "--library", str(library.path),
          "--base-model", saved_base, "--fallback", "never"])
    assert [r["input"] for r in json.loads(capsys.readouterr().out)] == inputs
