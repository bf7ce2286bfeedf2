import json
import multiprocessing

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import EXPERTS, make_model, save_random_lora
from lorahub_plus.errors import IncompatibleAdapterError, LibraryError
from lorahub_plus.library.index import build_index, search_index, write_index
from lorahub_plus.library.store import Library


def test_add_writes_card_and_verify_passes(library):
    assert library.names() == sorted(EXPERTS)
    card = library.card("word_sorting")
    assert card.rank == 4 and card.target_modules == ["q_proj", "v_proj"]
    assert card.modules["model.layers.0.self_attn.q_proj"] == [32, 32, 4]
    assert card.base_fingerprint == library.fingerprint and len(card.sha256) == 64
    assert library.verify() == []


@pytest.mark.parametrize("query, expected", [
    ("sum of two integers", "arithmetic_addition"),
    ("is this customer opinion favourable?", "sentiment_reviews"),
    ("render English text in French", "french_translation"),
    ("put words in lexicographic order", "word_sorting"),
    ("check if a statement is factually correct", "fact_checking"),
    ("what does this script print", "python_code"),
])
def test_search_finds_paraphrased_descriptions(library, query, expected):
    hits = library.search(query, k=3)
    assert hits[0].name == expected and hits[0].score >= hits[1].score


def test_search_by_examples_uses_centroids(library):
    assert library.search_by_examples(["Sort a list of words into alphabetical order. example 9"], k=1)[0].name == "word_sorting"


def test_tampered_weights_fail_verify(library):
    path = library.path / "word_sorting" / "adapter_model.safetensors"
    weights = load_file(str(path))
    weights = {k: v + 1 for k, v in weights.items()}
    save_file(weights, str(path))
    assert any("sha256" in p for p in library.verify())


def test_incompatible_adapter_is_refused_with_reason(library, tokenizer, tmp_path):
    other = save_random_lora(make_model(tokenizer, hidden=48), tmp_path / "wide", seed=0)
    with pytest.raises(IncompatibleAdapterError, match=r"q_proj` is 48->48 in the adapter but 32->32"):
        library.add(other, description="wide")
    deep = save_random_lora(make_model(tokenizer, layers=3), tmp_path / "deep", seed=0)
    with pytest.raises(IncompatibleAdapterError, match="layers.2.self_attn.q_proj` does not exist"):
        library.add(deep, description="deep")
    assert library.names() == sorted(EXPERTS)


def test_pickles_and_nan_are_refused(library, tokenizer, tmp_path):
    folder = save_random_lora(make_model(tokenizer), tmp_path / "a", seed=9)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(weights, folder / "adapter_model.bin")
    with pytest.raises(LibraryError, match="only safetensors"):
        library.add(folder, description="x")
    key = next(iter(weights))
    weights[key][0, 0] = float("nan")
    save_file(weights, str(folder / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleAdapterError, match="NaN"):
        library.add(folder, description="x")


def test_duplicate_name_refused_and_replace_works(library, tokenizer, tmp_path):
    folder = save_random_lora(make_model(tokenizer), tmp_path / "word_sorting", seed=7)
    with pytest.raises(LibraryError, match="exists already"):
        library.add(folder, description="another")
    card = library.add(folder, description="Sort words backwards.", replace=True)
    assert library.card("word_sorting").sha256 == card.sha256 and library.verify() == []


def test_failed_index_write_leaves_library_unchanged(library, tokenizer, tmp_path, monkeypatch):
    before = {p.relative_to(library.path): p.read_bytes() for p in library.path.rglob("*") if p.is_file()}
    folder = save_random_lora(make_model(tokenizer), tmp_path / "newbie", seed=11)

    real, calls = write_index, []

    def fail_second(index, path):  # the first index file is written, the second is not
        calls.append(path)
        if len(calls) % 2 == 0:
            raise OSError("disk full")
        real(index, path)

    monkeypatch.setattr("lorahub_plus.library.store.write_index", fail_second)
    with pytest.raises(OSError):
        library.add(folder, description="A new expert.")
    with pytest.raises(OSError):
        library.add(folder, name="word_sorting", description="A replacement.", replace=True)
    with pytest.raises(OSError):
        library.remove("word_sorting")
    after = {p.relative_to(library.path): p.read_bytes() for p in library.path.rglob("*") if p.is_file()}
    assert after.keys() - {__import__("pathlib").Path(".lock")} == before.keys() - {__import__("pathlib").Path(".lock")}
    assert all(after[k] == v for k, v in before.items() if k.name != ".lock")


def test_remove_updates_index(library):
    library.remove("word_sorting")
    assert "word_sorting" not in library.names()
    assert all(h.name != "word_sorting" for h in library.search("sort words", k=10))
    assert library.verify() == []


def _add_many(path, sources, start):
    lib = Library(path)
    for i, src in enumerate(sources):
        lib.add(src, name=f"proc{start}_{i}", description=f"Expert number {start}-{i}.")


def test_concurrent_adds_lose_nothing(library, tokenizer, tmp_path):
    sources = [save_random_lora(make_model(tokenizer), tmp_path / f"s{i}", seed=20 + i) for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(library.path, sources[j::2], j)) for j in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    names = library.names()
    assert {"proc0_0", "proc0_1", "proc1_0", "proc1_1"} <= set(names)
    assert json.loads((library.path / "index" / "names.json").read_text())["description"] == names
    assert library.verify() == []


def test_missing_library_file_is_a_clear_error(tmp_path):
    with pytest.raises(LibraryError, match="not a library"):
        Library(tmp_path)


@pytest.mark.parametrize("n, threshold", [(300, 10_000), (3000, 1000)])
def test_faiss_topk_matches_brute_force(n, threshold):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(n, 64)).astype(np.float32)
    queries = rng.normal(size=(50, 64)).astype(np.float32)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    exact = np.argsort(-(queries @ unit.T), axis=1)[:, :10]
    _, ids = search_index(build_index(data, hnsw_threshold=threshold), queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert recall == 1.0 if n < threshold else recall >= 0.95
