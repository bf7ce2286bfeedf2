import json

import pytest

from lorahub_plus.cli import main


def run(capsys, *argv):
    main(list(argv))
    return capsys.readouterr().out


def test_search_json_ranks_expected_expert_first(library, capsys):
    out = json.loads(run(capsys, "search", "translate a sentence to French", "-k", "2", "--json",
                         "--library", str(library.path)))
    assert [h["name"] for h in out][0] == "french_translation" and len(out) == 2


def test_library_list_show_verify(library, capsys):
    listed = json.loads(run(capsys, "library", "list", "--json", "--library", str(library.path)))
    assert len(listed) == 6
    shown = json.loads(run(capsys, "library", "show", "word_sorting", "--json", "--library", str(library.path)))
    assert shown["name"] == "word_sorting"
    assert "ok: 6 experts" in run(capsys, "library", "verify", str(library.path))


def test_every_command_prints_its_help():
    """Help text is %-formatted by argparse: a bare % in a config field's help once crashed `--help`."""
    import argparse

    from lorahub_plus.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    found = list(parsers(build_parser()))
    assert len(found) > 10 and all("usage:" in p.format_help() for p in found)


def test_errors_exit_2_with_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["library", "list", "--library", str(tmp_path)])
    assert exit_.value.code == 2 and "not a library" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["library", "list", "--json", "--library", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "not a library" in json.loads(out)["error"] and "not a library" in err


def test_eval_and_train_expert_on_a_saved_tiny_model(model, tokenizer, task_file, tmp_path, capsys):
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base = str(tmp_path / "base")
    zero = json.loads(run(capsys, "eval", "--task", str(task_file), "--method", "zero-shot", "--n-test", "6",
                          "--base-model", base, "--json"))
    assert zero["n"] == 6 and zero["method"] == "zero-shot"
    card = json.loads(run(capsys, "train-expert", str(task_file), "--out", str(tmp_path / "ex"), "--epochs", "1",
                          "--n-test", "6", "--rank", "2", "--base-model", base, "--json"))
    assert card["rank"] == 2 and card["metrics"]["n_test"] == 6
    adapted = json.loads(run(capsys, "eval", "--task", str(task_file), "--method", "adapter", "--adapter",
                             str(tmp_path / "ex"), "--n-test", "6", "--base-model", base, "--json"))
    assert adapted["n"] == 6 and adapted["method"] == "adapter"


def test_compose_writes_the_best_single_expert_by_default(model, tokenizer, library, tmp_path, capsys):
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"input": f"What is {a} plus 2?", "target": str(a + 2)}) + "\n"
                           for a in range(5)))
    report = json.loads(run(capsys, "compose", "--examples", str(few), "--description", "add two numbers", "-k", "3",
                            "--out", str(tmp_path / "out"), "--library", str(library.path),
                            "--base-model", str(tmp_path / "base"), "--json"))
    assert report["config"]["optimizer"] == "best-single" and len(report["names"]) == 3
    assert sorted(report["weights"]) == [0.0, 0.0, 1.0] and report["evaluations"] >= 3
    assert report["base_test"] == "loo" and not report["base_won"]  # an uncalibrated library: no candidate is close
    text = run(capsys, "compose", "--examples", str(few), "--description", "add two numbers", "-k", "3", "--out",
               str(tmp_path / "again"), "--library", str(library.path), "--base-model", str(tmp_path / "base"))
    assert f"wrote {tmp_path / 'again'}: " in text and "loss" in text and "no adapter" not in text
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "report.json"} <= written


def test_importing_the_package_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, lorahub_plus; from lorahub_plus import Hub; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
