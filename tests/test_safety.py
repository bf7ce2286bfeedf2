"""Nothing lost, nothing crashes: each hostile input of the new-user trial gets a one-line error that
names the file and what was expected, exit code 2 (verify: 1), and leaves every file as it was."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_model, save_random_lora
from lorahub_plus.cli import main
from lorahub_plus.library.store import Library


def fails(capsys, *argv, code=2) -> str:
    """Run the CLI, expect exit `code`, return stderr (one line, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # not transformers' progress bars
    assert exit_.value.code == code and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def files(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def base(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def few(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"input": f"What is {a} plus 2?", "target": str(a + 2)}) + "\n"
                            for a in range(4)))
    return path


def compose_args(library, base, few, out, *extra):
    return ["compose", "--examples", few, "--description", "add two numbers", "-k", "2", "--out", out,
            "--library", library.path, "--base-model", base, *extra]


# -- outputs never overwrite a user's files ---------------------------------------------------------------
def test_compose_refuses_a_folder_of_user_files_even_with_overwrite(library, base, few, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    before = files(user)
    assert "not empty" in fails(capsys, *compose_args(library, base, few, user))
    assert "did not write" in fails(capsys, *compose_args(library, base, few, user, "--overwrite"))
    assert files(user) == before


def test_compose_refuses_an_existing_file(library, base, few, tmp_path, capsys):
    user = tmp_path / "notes.txt"
    user.write_text("keep me")
    assert "existing file" in fails(capsys, *compose_args(library, base, few, user))
    assert user.read_text() == "keep me" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_compose_refuses_an_unwritable_out_before_composing(library, base, few, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    err = fails(capsys, *compose_args(library, base, few, tmp_path / "afile" / "out"))
    assert str(tmp_path / "afile" / "out") in err and ".tmp-" not in err


def test_compose_overwrite_replaces_only_its_own_output(library, base, few, tmp_path, capsys):
    out = tmp_path / "out"
    main([str(a) for a in compose_args(library, base, few, out, "--json")])
    capsys.readouterr()
    main([str(a) for a in compose_args(library, base, few, out, "--json", "--overwrite")])
    assert json.loads(capsys.readouterr().out)["out"] == str(out) and (out / "adapter_model.safetensors").is_file()


def test_train_expert_refuses_a_folder_of_user_files(base, task_file, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "data.csv").write_text("1,2")
    assert "not empty" in fails(capsys, "train-expert", task_file, "--out", user, "--base-model", base)
    assert (user / "data.csv").read_text() == "1,2"


# -- the library's own files are never experts --------------------------------------------------------------
@pytest.mark.parametrize("name", ["library.json", "README.md", "index", "select.json", "accuracy.png", "notes"])
def test_reserved_and_foreign_names_are_refused_even_with_replace(library, tokenizer, tmp_path, capsys, name):
    (library.path / "notes").mkdir()
    (library.path / "README.md").write_text("# my library")
    src = save_random_lora(make_model(tokenizer), tmp_path / "src", seed=3)
    before = files(library.path)
    fails(capsys, "library", "add", src, "--name", name, "--description", "x", "--replace", "--library", library.path)
    assert files(library.path) == before and Library(library.path).verify() == []


# -- bad adapters -----------------------------------------------------------------------------------------
def bad_adapter(tokenizer, tmp_path, how: str):
    src = save_random_lora(make_model(tokenizer), tmp_path / how, seed=4)
    config_file, weights_file = src / "adapter_config.json", src / "adapter_model.safetensors"
    if how == "config-list":
        config_file.write_text("[1, 2]")
    elif how == "random-bytes":
        weights_file.write_bytes(os.urandom(300))
    elif how == "bad-header":
        data = bytearray(weights_file.read_bytes())
        data[8:20] = b"}{not json!!"
        weights_file.write_bytes(bytes(data))
    elif how == "rank-mismatch":
        config = json.loads(config_file.read_text())
        config["r"] = 16
        config_file.write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("how, expected", [("config-list", "adapter_config.json: expected a JSON object"),
                                           ("random-bytes", "adapter_model.safetensors: not a readable safetensors"),
                                           ("bad-header", "adapter_model.safetensors: not a readable safetensors"),
                                           ("rank-mismatch", "has rank 4, but")])
def test_bad_adapters_are_refused_by_add(library, tokenizer, tmp_path, capsys, how, expected):
    src = bad_adapter(tokenizer, tmp_path, how)
    before = files(library.path)
    assert expected in fails(capsys, "library", "add", src, "--description", "x", "--library", library.path)
    assert files(library.path) == before


@pytest.mark.parametrize("how", ["config-list", "random-bytes", "bad-header", "rank-mismatch"])
def test_verify_lists_a_broken_expert_and_checks_the_others(library, tokenizer, tmp_path, capsys, how):
    src = bad_adapter(tokenizer, tmp_path, how)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(src / name, library.path / "word_sorting" / name)
    (library.path / "python_code" / "card.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main(["library", "verify", "--json", "--library", str(library.path)])
    report = json.loads(capsys.readouterr().out)
    assert exit_.value.code == 1 and report["experts"] == 6
    assert any("word_sorting" in p for p in report["problems"]) and any("python_code" in p for p in report["problems"])
    assert not any("french_translation" in p for p in report["problems"])


@pytest.mark.parametrize("how", ["random-bytes", "rank-mismatch"])
def test_compose_and_eval_refuse_a_broken_expert(library, tokenizer, base, few, task_file, tmp_path, capsys, how):
    src = bad_adapter(tokenizer, tmp_path, how)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(src / name, library.path / "arithmetic_addition" / name)
    fails(capsys, "compose", "--examples", few, "--candidates", "arithmetic_addition,word_sorting",
          "--out", tmp_path / "out", "--library", library.path, "--base-model", base)
    assert not (tmp_path / "out").exists()
    fails(capsys, "eval", "--task", task_file, "--method", "adapter", "--adapter", src, "--n-test", "3",
          "--base-model", base)


def test_eval_refuses_an_expert_whose_weights_differ_from_its_card(library, base, task_file, capsys):
    path = library.path / "word_sorting" / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(path)).items()}, str(path))
    assert "sha256 differs" in fails(capsys, "eval", "--task", task_file, "--method", "adapter", "--adapter",
                                     library.path / "word_sorting", "--n-test", "3", "--base-model", base)


# -- indexes, search, task files ------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_index_is_reported_then_repaired(library, capsys, damage):
    index = library.path / "index" / "description.faiss"
    if damage == "missing":
        index.unlink()
    else:
        index.write_bytes(index.read_bytes()[:100])
    err_lib = Library(library.path, embedder=library.embedder, recover=False)
    assert any("description.faiss" in p for p in err_lib.verify())
    with pytest.raises(Exception, match="description.faiss") as error:
        err_lib.search("sort words", 2)
    assert error.type.__module__.startswith("lorahub_plus")
    with pytest.raises(SystemExit):
        main(["library", "verify", "--library", str(library.path)])
    assert "description.faiss" in capsys.readouterr().out
    main(["library", "repair", "--library", str(library.path)])
    assert "rebuilt the index" in capsys.readouterr().out
    assert Library(library.path, embedder=library.embedder).search("sort words", 1)[0].name == "word_sorting"


@pytest.mark.parametrize("argv, expected", [(["-k", "-1"], "`k` must be"), (["-k", "0"], "`k` must be")])
def test_search_refuses_bad_k(library, capsys, argv, expected):
    assert expected in fails(capsys, "search", "sort words", *argv, "--library", library.path)


def test_search_refuses_an_empty_query(library, capsys):
    assert "`description` must be a non-empty" in fails(capsys, "search", "  ", "--library", library.path)


def test_non_utf8_task_file_is_named(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"input": "café", "target": "x"}\n'.encode("latin-1"))
    assert f"{path}: not UTF-8" in fails(capsys, "compose", "--examples", path, "--out", tmp_path / "o")


# -- honest metadata ----------------------------------------------------------------------------------------
def test_local_base_model_paths_become_the_library_id(library, tokenizer, tmp_path, capsys):
    src = save_random_lora(make_model(tokenizer), tmp_path / "src", seed=5)
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "cache" / "SmolLM2")
    (src / "adapter_config.json").write_text(json.dumps(config))
    card = library.add(src, name="pathy", description="x")
    written = json.loads((library.path / "pathy" / "adapter_config.json").read_text())
    assert card.base_model == written["base_model_name_or_path"] == library.base_model
    (library.path / "pathy" / "adapter_config.json").write_text(json.dumps(config))  # as old builds wrote it
    assert any("pathy/adapter_config.json: names base model" in p for p in library.verify())
    main(["library", "repair", "--library", str(library.path)])
    assert "pathy/adapter_config.json" in capsys.readouterr().out and library.verify() == []


# -- review findings: a user's folder, races with the output, damaged experts, more malformed fields ----------
def test_create_refuses_a_folder_with_files(tmp_path, tokenizer):
    from lorahub_plus.errors import LibraryError

    (tmp_path / "mine" / ".tmp-drafts").mkdir(parents=True)
    (tmp_path / "mine" / ".tmp-drafts" / "ch1.tex").write_text("draft")
    with pytest.raises(LibraryError, match="not empty"):
        Library.create(tmp_path / "mine", make_model(tokenizer))
    assert (tmp_path / "mine" / ".tmp-drafts" / "ch1.tex").read_text() == "draft"


def test_files_that_appear_in_out_during_the_work_are_kept(tmp_path):
    from lorahub_plus.library.atomic import atomic_dir, check_output_dir
    from lorahub_plus.errors import OutputPathError

    out = tmp_path / "out"
    check_output_dir(out)
    with pytest.raises(OutputPathError, match="not empty"):
        with atomic_dir(out, guard=lambda: check_output_dir(out)) as tmp:
            out.mkdir()
            (out / "notes.txt").write_text("written meanwhile")
            (tmp / "report.json").write_text("{}")
    assert (out / "notes.txt").read_text() == "written meanwhile" and not list(tmp_path.glob(".tmp-*"))


def test_overwrite_refuses_our_output_with_a_user_file_in_it_and_outs_inside_a_library(library, tmp_path):
    from lorahub_plus.library.atomic import check_output_dir
    from lorahub_plus.errors import OutputPathError

    out = tmp_path / "out"
    out.mkdir()
    (out / "card.json").write_text(json.dumps({"lorahub_plus_version": "0.1.0"}))
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(OutputPathError, match="thesis.tex"):
        check_output_dir(out, overwrite=True)
    with pytest.raises(OutputPathError, match="inside a library"):
        check_output_dir(library.path / "word_sorting", overwrite=True)


@pytest.mark.parametrize("damage", ["bytes", "2-D", "bf16"])
def test_a_damaged_expert_does_not_lock_everyone_out(library, capsys, damage):
    path = library.path / "word_sorting" / "embeddings.safetensors"
    import torch

    if damage == "bytes":
        path.write_bytes(b"garbage")
    else:
        vectors = load_file(str(path))
        save_file({k: (v[None].repeat(2, 1) if damage == "2-D" else v.bfloat16()) for k, v in vectors.items()}, str(path))
    lib = Library(library.path, embedder=library.embedder)  # opens, rebuilding the index without that expert
    assert lib.search("translate to French", 1)[0].name == "french_translation"
    lib.remove("python_code")
    problems = lib.verify()
    assert (damage == "bf16") == (not any("word_sorting" in p for p in problems))
    assert torch.is_tensor(lib.vectors("french_translation")["description"])


@pytest.mark.parametrize("field, value, expected", [
    ("rank_pattern", {"q_proj": 0}, "must be a finite number > 0"), ("rank_pattern", {"(": 4}, "not a regular expression"),
    ("alpha_pattern", {"[": 4.0}, "not a regular expression"), ("rank_pattern", {"q_proj": -4}, "must be a finite number > 0"),
    ("rank_pattern", {"q_proj": 2.5}, "rank_pattern")])
def test_bad_rank_and_alpha_patterns_are_refused(tokenizer, tmp_path, field, value, expected):
    from lorahub_plus.library.adapters import read_adapter
    from lorahub_plus.errors import IncompatibleAdapterError

    src = save_random_lora(make_model(tokenizer), tmp_path / "a", seed=1)
    config = json.loads((src / "adapter_config.json").read_text())
    config[field], config["use_rslora"] = value, True
    (src / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleAdapterError, match=expected):
        read_adapter(src)


def test_more_malformed_fields_are_named(library, tmp_path, task_file):
    from lorahub_plus.library.build import Selection
    from lorahub_plus.errors import LibraryError, TaskFormatError
    from lorahub_plus.tasks import load_task

    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"input": "x", "target": "y", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(TaskFormatError, match="huge.jsonl"):
        load_task(huge)
    meta = json.loads((library.path / "library.json").read_text())
    (library.path / "library.json").write_text(json.dumps({**meta, "embedder": 5}))
    with pytest.raises(LibraryError, match="embedder"):
        Library(library.path)
    (library.path / "library.json").write_text(json.dumps(meta))
    card = json.loads((library.path / "word_sorting" / "card.json").read_text())
    (library.path / "word_sorting" / "card.json").write_text(json.dumps({**card, "metrics": {"base_accuracy": "high"}}))
    with pytest.raises(LibraryError, match="metrics.base_accuracy"):
        library.card("word_sorting")
    select = tmp_path / "select.json"
    for bad, expected in (({"lr": "fast"}, "lr"), ({"rnak": 8}, "rnak"), ({"name": "../x"}, "name")):
        select.write_text(json.dumps({"defaults": {}, "tasks": [{"task": "tiny_add", **bad}]}))
        with pytest.raises(LibraryError, match=expected):
            Selection.read(select)


# -- the second hostile-input sweep (session 21) ---------------------------------------------------------------
def test_out_anywhere_inside_a_library_is_refused_but_its_build_staging_is_not(library, tmp_path):
    from lorahub_plus.library.atomic import check_output_dir
    from lorahub_plus.errors import OutputPathError

    for inside in (library.path / "index" / "mine", library.path / "word_sorting" / "a" / "b"):
        with pytest.raises(OutputPathError, match="inside a library"):  # the library's next write would delete it
            check_output_dir(inside)
    assert check_output_dir(library.path / ".build" / "shard0of1" / "expert") and check_output_dir(tmp_path / "o")


def test_a_damaged_card_is_repaired_around_and_can_be_removed(library, capsys):
    before = files(library.path / "french_translation")
    (library.path / "word_sorting" / "card.json").write_text('{"name": "word_so')  # truncated
    (library.path / "index" / "names.json").write_text("{}")  # and a stale index: everything used to fail
    lib = Library(library.path, embedder=library.embedder)  # opening repairs what it can
    assert lib.search("translate to French", 1)[0].name == "french_translation"
    main(["library", "remove", "word_sorting", "--library", str(library.path)])
    assert "word_sorting" not in lib.names() and lib.verify() == [] and files(lib.path / "french_translation") == before


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e308, -8, 0])
def test_a_lora_alpha_that_is_not_a_finite_positive_scale_is_refused(library, tokenizer, tmp_path, capsys, alpha):
    src = save_random_lora(make_model(tokenizer), tmp_path / "a", seed=1)
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    before = files(library.path)
    assert "lora_alpha" in fails(capsys, "library", "add", src, "--name", "odd", "--description", "x",
                                 "--library", library.path)
    assert files(library.path) == before


@pytest.mark.parametrize("centroid", [torch.ones(3, 384), torch.ones(10)])
def test_add_refuses_a_source_centroid_the_index_cannot_hold(library, tokenizer, tmp_path, centroid):
    from lorahub_plus.errors import LibraryError

    src = save_random_lora(make_model(tokenizer), tmp_path / "a", seed=1)
    save_file({"centroid": centroid}, str(src / "embeddings.safetensors"))
    before = files(library.path)
    with pytest.raises(LibraryError, match="embeddings.safetensors: tensor `centroid`"):
        library.add(src, name="odd", description="x")
    assert files(library.path) == before


def test_lone_surrogates_and_blank_inputs_are_named(tmp_path):
    from lorahub_plus.errors import TaskFormatError
    from lorahub_plus.tasks import load_task

    path = tmp_path / "few.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n{"input": "\\ud800", "target": "b"}\n')
    with pytest.raises(TaskFormatError, match=r"few.jsonl: line 2: holds a lone surrogate"):
        load_task(path)
    path.write_text('{"input": "a", "target": "b"}\n{"input": "   ", "target": "b"}\n')
    with pytest.raises(TaskFormatError, match=r"few.jsonl: line 2: field `input` is empty"):
        load_task(path)


def test_a_module_shape_in_library_json_is_checked(library):
    from lorahub_plus.errors import LibraryError

    meta = json.loads((library.path / "library.json").read_text())
    module = next(iter(meta["modules"]))
    (library.path / "library.json").write_text(json.dumps({**meta, "modules": {**meta["modules"], module: [32]}}))
    with pytest.raises(LibraryError, match=f"field `modules.{module}` must be \\[in_features, out_features\\]"):
        Library(library.path)


def test_summary_lists_an_expert_with_partial_metrics_instead_of_crashing(library):
    from lorahub_plus.library.build import write_summary

    card = json.loads((library.path / "word_sorting" / "card.json").read_text())
    (library.path / "word_sorting" / "card.json").write_text(json.dumps({**card, "metrics": {"expert_accuracy": 0.9}}))
    readme = write_summary(library).read_text()
    assert "`word_sorting`" in readme and not list(library.path.glob(".tmp-*"))


def test_an_adapter_for_another_base_model_is_refused_before_peft(base, tokenizer, task_file, tmp_path, capsys):
    src = save_random_lora(make_model(tokenizer, hidden=64), tmp_path / "wide", seed=1)
    assert "64->64 in the adapter" in fails(capsys, "eval", "--task", task_file, "--method", "adapter", "--adapter",
                                              src, "--n-test", "3", "--base-model", base)


def test_a_base_model_stored_as_a_pickle_is_never_loaded(model, tokenizer, task_file, tmp_path, capsys):
    model.save_pretrained(tmp_path / "pickled")
    tokenizer.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()  # transformers writes safetensors only: pickle by hand
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    assert "safetensors" in fails(capsys, "eval", "--task", task_file, "--n-test", "3", "--base-model",
                                  tmp_path / "pickled")


@pytest.mark.parametrize("flag, value", [("--max-length", "1"), ("--export-rank", "-1"), ("--seed", "-1")])
def test_compose_numbers_are_checked_before_any_work(library, base, few, tmp_path, capsys, flag, value):
    assert flag.lstrip("-").replace("-", "_") in fails(capsys, *compose_args(library, base, few, tmp_path / "o",
                                                                               flag, value))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, value", [("l1", float("nan")), ("bound", -1.0), ("lr", float("nan"))])
def test_compose_variant_numbers_are_checked(name, value):
    from lorahub_plus.compose.config import Variant

    with pytest.raises(ValueError, match=name):  # benchmark settings (no flags): checked when the Variant is made
        Variant(**{name: value})


def test_build_checks_its_arguments_before_creating_a_library(tmp_path, few, capsys):
    fails(capsys, "library", "build", "--select", tmp_path / "missing.json", "--out", tmp_path / "new")
    fails(capsys, "library", "build", "--select", few, "--shard", "3/2", "--out", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_text_that_is_not_utf8_is_named_and_such_a_path_still_works(library, tmp_path, capsys):
    assert "`query` is not valid UTF-8" in fails(capsys, "search", "caf\udce9", "--library", library.path)
    odd = tmp_path / os.fsdecode(b"lib\xe9")  # a file name in another encoding: Python keeps it as a surrogate
    shutil.copytree(library.path, odd)
    main(["library", "list", "--json", "--library", str(odd)])
    assert len(json.loads(capsys.readouterr().out)) == len(library.names())


def test_an_out_reached_through_a_symlink_into_a_library_is_refused(library, tmp_path):
    from lorahub_plus.library.atomic import check_output_dir
    from lorahub_plus.errors import OutputPathError

    os.symlink(library.path / "word_sorting", tmp_path / "link")
    with pytest.raises(OutputPathError, match="inside a library"):
        check_output_dir(tmp_path / "link" / "x")


def test_a_lora_on_gpt2s_conv1d_layers_attaches(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorahub_plus.library.adapters import attach_adapter

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    get_peft_model(GPT2LMHeadModel(gpt2.config), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                            init_lora_weights=False)).save_pretrained(tmp_path / "a")
    peft_model = attach_adapter(gpt2, tmp_path / "a")
    assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) == 1


@pytest.mark.parametrize("config, values", [
    ("library.train.TrainConfig", {"n_test": -5}), ("library.train.TrainConfig", {"lr": float("nan")}),
    ("library.train.TrainConfig", {"dropout": 1.5}), ("routing.gate.GateConfig", {"temperature": float("inf")}),
    ("routing.routers.RouterConfig", {"temperature": float("inf")}),
    ("hypernet.training.HypernetTrainConfig", {"reg": float("nan")}), ("scoring.EvalConfig", {"seed": -1})])
def test_configs_refuse_numbers_that_are_not_finite_or_in_range(config, values):
    import importlib

    module, name = config.rsplit(".", 1)
    with pytest.raises(ValueError, match=next(iter(values))):
        getattr(importlib.import_module(f"lorahub_plus.{module}"), name)(**values)


def test_a_blank_input_with_choices_still_loads(tmp_path):
    from lorahub_plus.tasks import load_task

    path = tmp_path / "mc.jsonl"
    path.write_text('{"input": "", "target": "b", "choices": ["a", "b"]}\n')
    assert load_task(path).examples[0].choices == ("a", "b")


# -- the third sweep: the Python API and new surfaces -----------------------------------------------------------
def test_nothing_to_stack_or_compose_is_named(library, model, tokenizer, task_file):
    from lorahub_plus.compose.config import ComposeConfig, Variant
    from lorahub_plus.compose.composer import compose
    from lorahub_plus.errors import LibraryError
    from lorahub_plus.library.stack import load_stack
    from lorahub_plus.tasks import load_task

    with pytest.raises(LibraryError, match="no experts to stack"):
        load_stack(library, [])
    few = load_task(task_file)
    for variant in (Variant(), Variant(candidates="random")):
        with pytest.raises(LibraryError, match="no experts to compose"):
            compose(model, tokenizer, few, library, ComposeConfig(), description="add", exclude=library.names(),
                    variant=variant)
    with pytest.raises(ValueError, match="not one string"):
        compose(model, tokenizer, few, library, description="add", exclude="word_sorting")


def test_the_routing_text_of_a_blank_multiple_choice_input_is_its_choices():
    from lorahub_plus.tasks import Example, Task

    task = Task("t", [Example("", "b", ("a", "b")), Example("x", "a", ("a", "b")), Example(" ", "c")])
    assert [task.routing_text(ex) for ex in task.examples] == ["a\nb", "x", " "]  # no choices: still blank, refused


def test_a_model_that_already_carries_adapters_is_refused(library, model, tokenizer, tmp_path):
    from lorahub_plus.library.adapters import attach_adapter
    from lorahub_plus.routing.routers import Router

    router = Router(library, model, tokenizer)
    with pytest.raises(ValueError, match="already carries adapters"):
        Router(library, model, tokenizer)  # a notebook cell run twice
    with pytest.raises(ValueError, match="already carries adapters"):
        attach_adapter(model, library.path / "word_sorting")
    router.remove()
    attach_adapter(model, library.path / "word_sorting").unload()  # back to a bare model: accepted


def test_multitask_per_task_and_a_base_model_that_is_no_model_are_named(tmp_path, capsys, library):
    from lorahub_plus.models import load_base_model

    assert "--per-task" in fails(capsys, "train-multitask", "--out", tmp_path / "m", "--per-task", "0",
                                 "--library", library.path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a model folder"):
        load_base_model(tmp_path / "folder")
    with pytest.raises(ValueError, match="no such folder"):
        load_base_model("./no/such/model")


def test_add_refuses_a_bare_string_where_a_list_belongs(library, tokenizer, tmp_path):
    from lorahub_plus.errors import LibraryError

    src = save_random_lora(make_model(tokenizer), tmp_path / "a", seed=1)
    for kwargs in ({"keywords": "math"}, {"examples": "What is 2 plus 2?"}, {"description": 123},
                   {"examples": ["2 plus 2", " "]}):
        with pytest.raises(LibraryError, match=f"field `{next(iter(kwargs))}`"):
            library.add(src, name="odd", **{"description": "x", **kwargs})
    assert "odd" not in library.names()


def test_a_writer_waiting_for_the_lock_says_so(library, tokenizer, tmp_path, caplog):
    import threading
    import time

    from filelock import FileLock

    src = save_random_lora(make_model(tokenizer), tmp_path / "a", seed=1)
    held = threading.Event()

    def hold():  # another writer, as another process would be
        with FileLock(str(library.path / ".lock")):
            held.set()
            time.sleep(3)
    threading.Thread(target=hold).start()
    held.wait()
    with caplog.at_level("WARNING"):
        library.add(src, name="late", description="x")
    assert "waiting for the library lock" in caplog.text and "late" in library.names()


@pytest.mark.parametrize("choices", [("yes", "no"), ()])
def test_a_task_with_an_empty_prompt_is_scored(model, tokenizer, choices):
    from lorahub_plus.encode import encode_pair
    from lorahub_plus.scoring import EvalConfig, score
    from lorahub_plus.tasks import Example, Task

    task = Task("t", [Example("", "yes", choices)] * 3, kind="multiple_choice" if choices else "generative",
                input_prefix="", output_prefix="", append_choices_to_input=False)  # misconceptions_russian's shape
    assert task.build_prompt(task.examples[0]) == "" and encode_pair(tokenizer, "", "yes", 16).n_prompt == 1
    correct, _, _, _ = score(model, tokenizer, task, task.examples, cfg=EvalConfig(n_test=3, max_new_tokens=2))
    assert len(correct) == 3
