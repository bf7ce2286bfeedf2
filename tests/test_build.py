import json

import pytest

from lorahub_plus.library.build import Selection, build_library, write_summary
from lorahub_plus.errors import LibraryError
from lorahub_plus.library.store import Library


def test_build_trains_resumes_and_summarizes(model, tokenizer, task_file, tmp_path, embedder):
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    lib = Library.create(tmp_path / "lib", model, load_from=str(tmp_path / "base"), embedder=embedder)
    selection = Selection({"epochs": 1, "n_test": 6, "rank": 2}, [{"task": str(task_file), "name": "adder"}])
    report = build_library(selection, lib, progress=False)
    assert [r["status"] for r in report] == ["built"] and lib.names() == ["adder"]
    assert lib.verify() == [] and not (lib.path / ".build").exists()
    assert [r["status"] for r in build_library(selection, lib, progress=False)] == ["skipped (built)"]
    readme = write_summary(lib).read_text()
    assert "| adder |" in readme and (lib.path / "accuracy.png").stat().st_size > 1000


def test_selection_refuses_dev_tasks(tmp_path):
    path = tmp_path / "select.json"
    path.write_text(json.dumps({"tasks": ["a_task", {"task": "dev_one", "epochs": 3}]}))
    assert [t["name"] for t in Selection.read(path).tasks] == ["a_task", "dev_one"]
    with pytest.raises(LibraryError, match=r"tasks\[1\]: `dev_one` is a held-out dev task"):
        Selection.read(path, exclude={"dev_one"})


def test_shards_split_the_selection(model, tokenizer, task_file, tmp_path, embedder):
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    lib = Library.create(tmp_path / "lib", model, load_from=str(tmp_path / "base"), embedder=embedder)
    selection = Selection({"epochs": 1, "n_test": 6, "rank": 2},
                          [{"task": str(task_file), "name": n} for n in ("a0", "a1", "a2")])
    assert [r["name"] for r in build_library(selection, lib, progress=False, shard=(1, 2))] == ["a1"]
    assert [r["status"] for r in build_library(selection, lib, progress=False, shard=(0, 2))] == ["built", "built"]
    assert lib.names() == ["a0", "a1", "a2"] and not (lib.path / ".build").exists()
