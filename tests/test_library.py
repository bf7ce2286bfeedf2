import json
import multiprocessing

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import EXPERTS, make_model, save_random_lora
from lorahub_plus.errors import IncompatibleAdapterError, LibraryError
from lorahub_plus.library.index import build_index, read_index, search_index, write_index
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


def test_search_reads_the_index_once_until_another_process_changes_it(library, embedder, tokenizer, tmp_path,
                                                                       monkeypatch):
    reads = []

    def counted(path, **checks):
        reads.append(path)
        return read_index(path, **checks)

    monkeypatch.setattr("lorahub_plus.library.store.read_index", counted)
    assert library.search("put words in lexicographic order", k=1)[0].name == "word_sorting"
    assert library.search("sum of two integers", k=1)[0].name == "arithmetic_addition"
    assert len(reads) == 1  # the second search neither re-reads nor re-hashes description.faiss
    other = Library(library.path, embedder=embedder)  # another process: `library` is not told of its write
    other.add(save_random_lora(make_model(tokenizer), tmp_path / "src", seed=31), name="roman_numerals",
              description="Convert numbers to Roman numerals.")
    assert library.search("write a number in Roman numerals", k=1)[0].name == "roman_numerals"
    assert len(reads) == 2


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


def test_the_embedder_identity_is_recorded_and_a_centroid_from_another_embedder_is_refused(library, tokenizer, tmp_path):
    from lorahub_plus.library.store import EMBEDDINGS_FILE, save_vectors
    from lorahub_plus.models import embedder_identity

    assert library.meta["embedder_identity"]["dim"] == 384
    assert library.vectors("word_sorting") and library.check_vectors(library.path / "word_sorting" / EMBEDDINGS_FILE) is None
    folder = save_random_lora(make_model(tokenizer), tmp_path / "other", seed=9)

    class Other:  # 384 dimensions too, but another space
        def encode(self, texts, **_):
            rng = np.random.default_rng(len(texts[0]))
            x = rng.normal(size=(len(texts), 384)).astype(np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

    save_vectors({"centroid": torch.ones(384) / 384 ** 0.5}, folder / EMBEDDINGS_FILE, embedder_identity(Other(), "other"))
    with pytest.raises(LibraryError, match=r"embeddings.safetensors: metadata `embedder_identity`.*other"):
        library.add(folder, name="other", description="another embedder's centroid")
    assert "other" not in library.names()
    library.add(folder, name="other", description="another embedder's centroid", examples=["fresh inputs"])
    assert "centroid" in library.vectors("other")  # embedded again by the library's own embedder


def test_opening_a_library_whose_embedder_changed_says_so_before_any_search(library, monkeypatch):
    from lorahub_plus.library import store

    meta = json.loads((library.path / store.LIBRARY_FILE).read_text())
    meta["embedder_identity"]["probe"] = meta["embedder_identity"]["probe"][::-1]  # another space
    (library.path / store.LIBRARY_FILE).write_text(json.dumps(meta))
    with pytest.raises(LibraryError, match="library.json: field `embedder_identity`"):
        Library(library.path).search("add two numbers")


def test_calibration_is_stored_with_the_library_one_entry_at_a_time(library):
    assert library.calibration("close") is None
    library.set_calibration("close", 0.5, {"by": "a test"})
    library.set_calibration("route_fallback", None, {"never": True}, hypernet={"sha256": "x"})
    assert library.calibration("close") == {"value": 0.5, "evidence": {"by": "a test"}}
    assert library.calibration("route_fallback")["hypernet"] == {"sha256": "x"}
    (library.path / "calibration.json").write_text(json.dumps({"close": {"value": "high"}}))
    with pytest.raises(LibraryError, match=r"calibration.json: .*close.value"):
        library.calibration("close")


def test_retrieval_scores_mean_the_description_and_centroid_cosines(library):
    both = library.scores("add two numbers", ["What is 2 plus 3?"])
    alone = library.scores("add two numbers")
    examples = library.scores(inputs=["What is 2 plus 3?"])
    assert set(both) == set(library.names())
    for name in both:
        assert both[name] == pytest.approx((alone[name] + examples[name]) / 2, abs=1e-5)
    sims = library.similarities(["What is 2 plus 3?", "sort these words"], library.names())
    assert sims.shape == (2, len(library.names()))
    assert max(both, key=both.get) == "arithmetic_addition"


def test_an_artefact_replaces_its_folder_whole_and_never_takes_an_experts_name(library):
    with library.artefact("gate") as tmp:
        (tmp / "gate.json").write_text("{}")
    assert (library.path / "gate" / "gate.json").is_file() and "gate" not in library.names()
    with pytest.raises(RuntimeError), library.artefact("gate") as tmp:
        (tmp / "half.json").write_text("{}")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in (library.path / "gate").iterdir()) == ["gate.json"]
    with pytest.raises(LibraryError, match="an expert has that name"):
        with library.artefact("word_sorting"):
            pass


def test_large_indexes_are_ivf_and_keep_their_probes_through_a_file(tmp_path):
    import faiss

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 16))
    x = (centers[rng.integers(0, 40, 12000)] + 0.05 * rng.normal(size=(12000, 16))).astype(np.float32)
    index = build_index(x, hnsw_threshold=100, ivf_threshold=10000)
    assert isinstance(index, faiss.IndexIVFFlat) and index.nprobe >= 1
    assert (search_index(index, x[:50], 1)[1][:, 0] == np.arange(50)).mean() >= 0.9
    write_index(index, tmp_path / "ivf.faiss")
    assert read_index(tmp_path / "ivf.faiss").nprobe == index.nprobe
