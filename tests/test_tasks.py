import json

import pytest

from lorahub_plus.errors import TaskFormatError
from lorahub_plus.tasks import Example, Task, expert_split, load_task, split_examples


def test_bigbench_file_loads_with_prefixes(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({
        "name": "p:q", "description": "d", "keywords": ["k"], "kind": "multiple_choice",
        "task_prefix": "Choose.", "example_input_prefix": "\nIn: ", "example_output_prefix": "\nOut: ",
        "examples": [{"input": "x", "target": "b", "choices": ["a", "b"]}]}))
    task = load_task(path)
    assert task.kind == "multiple_choice" and task.input_prefix == "\nIn: "
    assert task.build_prompt(task.examples[0]) == "Choose.\nIn: x\n  choice: a\n  choice: b\nOut: "


def test_default_prefixes_and_shots():
    task = Task("t", [Example("1+1", "2"), Example("2+2", "4")])
    prompt = task.build_prompt(task.examples[1], [task.examples[0]])
    assert prompt == "Q: 1+1\nA: 2\nQ: 2+2\nA: "


def test_jsonl_loads_and_detects_kind(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text('{"input": "a", "target": "x", "choices": ["x", "y"]}\n\n{"input": "b", "target": "y", "choices": ["x", "y"]}\n')
    task = load_task(path)
    assert len(task.examples) == 2 and task.kind == "multiple_choice"


@pytest.mark.parametrize("line, message", [
    ('{"input": "a"}', "line 2: missing field `target`"),
    ('{"input": 3, "target": "x"}', "line 2: field `input` must be a string"),
    ('{"input": "a", "target": "z", "choices": ["x"]}', "line 2: field `target` 'z' is not one of `choices`"),
    ('{"input": "a", ', "line 2: not valid JSON"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "ok", "target": "x"}\n' + line + "\n")
    with pytest.raises(TaskFormatError) as err:
        load_task(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_malformed_bigbench_names_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "examples": [{"input": "a", "target": "b"}, {"target": "c"}]}))
    with pytest.raises(TaskFormatError, match=r"examples\[1\]: missing field `input`"):
        load_task(path)
    path.write_text(json.dumps({"name": "x", "kind": "mc", "examples": [{"input": "a", "target": "b"}]}))
    with pytest.raises(TaskFormatError, match="field `kind`"):
        load_task(path)


def test_split_is_seeded_and_disjoint():
    examples = [Example(str(i), str(i)) for i in range(50)]
    train, test = split_examples(examples, 10, seed=3)
    assert split_examples(examples, 10, seed=3) == (train, test)
    assert split_examples(examples, 10, seed=4)[1] != test
    assert len(test) == 10 and not set(e.input for e in train) & set(e.input for e in test)


def test_expert_split_holds_out_at_most_a_third():
    small = Task("t", [Example(str(i), str(i)) for i in range(30)])
    train, test = expert_split(small, n_test=50)
    assert (len(train), len(test)) == (20, 10)
    big = Task("t", [Example(str(i), str(i)) for i in range(300)])
    assert len(expert_split(big, n_test=50)[1]) == 50 and expert_split(big) == expert_split(big)


@pytest.mark.slow
def test_every_shared_task_file_loads():
    """The whole data set parses under the strict loader (six files spell a flag as the string "false")."""
    from lorahub_plus.paths import data_dir

    files = sorted(data_dir().glob("*.json"))
    assert len(files) > 900 and all(load_task(p).examples for p in files)
    assert load_task(data_dir() / "logic_grid_puzzle.json").append_choices_to_input is False
