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


@pytest.mark.slow
def test_a_ray_build_trains_two_experts_as_tasks_and_the_library_verifies(model, tokenizer, task_file, tmp_path,
                                                                          embedder):
    pytest.importorskip("ray")
    import ray

    from lorahub_plus.library.build import build_library_ray

    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    lib = Library.create(tmp_path / "lib", model, load_from=str(tmp_path / "base"), embedder=embedder)
    selection = Selection({"epochs": 1, "n_test": 6, "rank": 2},
                          [{"task": str(task_file), "name": n} for n in ("r0", "r1")])
    try:
        report = build_library_ray(selection, lib, progress=False)
        assert sorted(r["status"] for r in report) == ["built", "built"] and lib.names() == ["r0", "r1"]
        assert lib.verify() == [] and not (lib.path / ".build").exists()
        assert [r["status"] for r in build_library_ray(selection, lib, progress=False)] == ["skipped (built)"] * 2
        broken = Selection({"epochs": 1, "n_test": 6, "rank": 2}, [{"task": str(tmp_path / "none.json"),
                                                                    "name": "r2"}])
        with pytest.raises(Exception, match="none.json"):  # a task file that is not there: refused before any work
            build_library_ray(broken, lib, progress=False)
        assert lib.names() == ["r0", "r1"]
        tiny = tmp_path / "tiny.jsonl"  # fails inside the worker (too few examples to hold out)
        tiny.write_text('{"input": "1 plus 1", "target": "2"}\n{"input": "2 plus 2", "target": "4"}\n')
        report = build_library_ray(Selection({"epochs": 1}, [{"task": str(tiny), "name": "r3"}]), lib, progress=False)
        assert report[0]["status"].startswith("failed") and "too few" in report[0]["status"]
        assert lib.names() == ["r0", "r1"] and lib.verify() == []  # reported, never half-added
    finally:
        ray.shutdown()
