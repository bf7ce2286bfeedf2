"""Every loader, fed random mutations of a valid file (truncations, byte flips, wrong JSON types,
wrong tensor shapes), either loads it or raises one of our errors naming the file: never a
traceback from json, safetensors, faiss, peft or a KeyError of ours."""
import json
import os
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorahub_plus.library.adapters import read_adapter
from lorahub_plus.errors import LoraHubPlusError
from lorahub_plus.library.store import Card, Library
from lorahub_plus.library.readers import read_safetensors
from lorahub_plus.tasks import load_task

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 300))  # 2,000 ran clean too (18,000 mutations)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """A truncation, or a few bytes flipped."""
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths(v, prefix + (i,))


@st.composite
def json_mutations(draw, data: bytes) -> bytes:
    """One value anywhere in the document (or the whole document) replaced by a random JSON value, or
    a byte mutation."""
    if draw(st.integers(0, 3)) == 0:
        return draw(byte_mutations(data))
    doc = json.loads(data)
    path = draw(st.sampled_from(list(_paths(doc))))
    new = draw(json_values)
    if not path:
        return json.dumps(new).encode()
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return json.dumps(doc).encode()


@st.composite
def safetensors_mutations(draw, data: bytes) -> bytes:
    """The header rewritten with other shapes, dtypes or offsets, or a byte mutation."""
    if draw(st.booleans()):
        return draw(byte_mutations(data))
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = draw(st.sampled_from(["shape", "dtype", "data_offsets"]))
    header[key][field] = draw({"shape": st.lists(st.integers(0, 40), max_size=3),
                               "dtype": st.sampled_from(["F16", "F32", "I64", "BOOL", "XX"]),
                               "data_offsets": st.lists(st.integers(0, 10**6), min_size=2, max_size=2)}[field])
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data[8 + n:]


def check(load, path, mutated: bytes):
    path.write_bytes(mutated)
    try:
        load()
    except LoraHubPlusError as e:
        assert str(path) in str(e), f"error does not name {path}: {e}"


def _library_files(library, tmp_path):
    dest = tmp_path / "fuzz"
    if not dest.exists():
        shutil.copytree(library.path, dest)
    return dest


@FUZZ
@given(data=st.data())
def test_task_files(task_file, data):
    path = task_file.with_name("mutated.json")
    check(lambda: load_task(path), path, data.draw(json_mutations(task_file.read_bytes())))


@FUZZ
@given(data=st.data())
def test_jsonl_files(tmp_path, data):
    path = tmp_path / "few.jsonl"
    original = b"".join(json.dumps({"input": f"{a} + 1", "target": str(a + 1)}).encode() + b"\n" for a in range(3))
    line = data.draw(st.integers(0, 2))
    lines = original.splitlines()
    lines[line] = data.draw(json_mutations(lines[line]))
    check(lambda: load_task(path), path, b"\n".join(lines))


@pytest.mark.parametrize("name", ["card.json", "adapter_config.json", "adapter_model.safetensors"])
@FUZZ
@given(data=st.data())
def test_expert_files(library, tmp_path, name, data):
    folder = _library_files(library, tmp_path) / "word_sorting"
    path = folder / name
    original = (library.path / "word_sorting" / name).read_bytes()
    mutate = safetensors_mutations if name.endswith(".safetensors") else json_mutations
    load = (lambda: Card.read(path)) if name == "card.json" else (lambda: read_adapter(folder))
    check(load, path, data.draw(mutate(original)))


@FUZZ
@given(data=st.data())
def test_embeddings_files(library, tmp_path, data):
    root = _library_files(library, tmp_path)
    path = root / "word_sorting" / "embeddings.safetensors"
    original = (library.path / "word_sorting" / "embeddings.safetensors").read_bytes()

    def load():  # the file itself, then the library that holds it, opened and searched
        read_safetensors(path)
        Library(root, embedder=library.embedder).search("sort words", 3)

    check(load, path, data.draw(safetensors_mutations(original)))


@pytest.mark.parametrize("name", ["library.json", "index/names.json", "index/description.faiss"])
@FUZZ
@given(data=st.data())
def test_library_files(library, tmp_path, name, data):
    root = _library_files(library, tmp_path)
    path = root / name
    original = (library.path / name).read_bytes()
    query = np.ones(library.embedder.get_embedding_dimension(), np.float32)

    def load():  # as found (no recovery), then a search through the index
        Library(root, embedder=library.embedder, recover=False)._search("description", query, 3)

    mutate = byte_mutations if name.endswith(".faiss") else json_mutations
    check(load, path, data.draw(mutate(original)))
