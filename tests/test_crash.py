"""Kill -9 at every write step of every library write: the library then opens in the state before
the operation or after it, complete and indexed, with nothing left over.

A child process counts its filesystem writes with an audit hook (renames, removals, mkdirs, opens
for writing) and kills itself at the n-th; n runs from 1 until the operation finishes unkilled.
"""
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys

import numpy as np
import pytest

from conftest import make_model, save_random_lora
from lorahub_plus.library.store import Library

WRITES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.truncate", "shutil.rmtree"}


class FakeEmbedder:
    """Deterministic unit vectors from a hash of the text: no model in the forked child."""

    def __init__(self, salt: str = ""):
        self.salt = salt

    def get_embedding_dimension(self) -> int:
        return 16

    def encode(self, texts, **_):
        rows = [np.frombuffer(hashlib.sha256((self.salt + t).encode()).digest()[:16], np.uint8) for t in texts]
        x = np.stack(rows).astype(np.float32) - 127.5
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def is_write(event: str, args) -> bool:
    if event in WRITES:
        return True
    if event == "open":
        _, mode, flags = args
        if isinstance(mode, str):
            return any(c in mode for c in "wax+")
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
    return False


def add_new(lib, src):
    lib.add(src, name="newbie", description="A new expert.", examples=["one input", "another input"])


def add_replace(lib, src):
    lib.add(src, name="expert_1", description="A replacement.", replace=True)


def remove(lib, src):
    lib.remove("expert_1")


def reindex(lib, src):
    lib._embedder = FakeEmbedder(salt="new")  # a changed embedder: every vector changes
    lib.reindex()


OPERATIONS = {"add": add_new, "add --replace": add_replace, "remove": remove, "reindex": reindex}


def _child(path, src, operation, kill_at, recover=True):
    """Open the library (recover=False: as found, so that the operation killed is the repair itself), then run
    the operation, killed at its kill_at-th write."""
    import torch

    torch.set_num_threads(1)
    lib = Library(path, embedder=FakeEmbedder(), recover=recover)
    count = 0

    def hook(event, args):
        nonlocal count
        if is_write(event, args):
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    OPERATIONS[operation](lib, src)


def snapshot(path):
    """Every file's bytes, less the lock and the index (derived data: checked by verify)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".lock" and p.relative_to(path).parts[0] != "index"}


@pytest.fixture(scope="module")
def crash_library(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("crash")
    model = make_model(tokenizer)
    lib = Library.create(root / "lib", model, embedder=FakeEmbedder())
    for i in range(3):
        src = save_random_lora(model, root / f"src{i}", seed=i)
        (src / "card.json").write_text(json.dumps({"name": f"expert_{i}", "description": f"Expert {i}.",
                                                   "created": "2026-01-01T00:00:00+00:00"}))
        lib.add(src, examples=[f"input {i}"])
    src = save_random_lora(model, root / "incoming", seed=9)
    (src / "card.json").write_text(json.dumps({"name": "incoming", "description": "x",
                                               "created": "2026-01-01T00:00:00+00:00"}))
    return lib.path, src


def _run(path, src, operation, kill_at, recover=True):
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(path, src, operation, kill_at, recover))
    proc.start()
    proc.join(60)
    return proc.exitcode


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_kill_at_every_write_step_leaves_before_or_after(crash_library, tmp_path, operation):
    template, src = crash_library
    before = snapshot(template)
    shutil.copytree(template, tmp_path / "after")
    assert _run(tmp_path / "after", src, operation, kill_at=0) == 0
    after = snapshot(tmp_path / "after")
    assert after != before
    outcomes, kill_at = set(), 1
    while True:
        lib_path = tmp_path / f"kill{kill_at}"
        shutil.copytree(template, lib_path)
        code = _run(lib_path, src, operation, kill_at)
        lib = Library(lib_path, embedder=FakeEmbedder())  # opening recovers
        state = snapshot(lib_path)
        assert state in (before, after), f"{operation} killed at write {kill_at}: neither before nor after"
        assert lib.verify() == [], f"{operation} killed at write {kill_at}"
        assert not [p for p in lib_path.iterdir() if p.name.startswith(".") and p.name != ".lock"]
        outcomes.add("before" if state == before else "after")
        shutil.rmtree(lib_path)
        if code == 0:
            break
        assert code == -signal.SIGKILL
        kill_at += 1
    assert kill_at > 5 and outcomes == {"before", "after"}  # the kill points span the commit point


def _repair(lib, src):
    lib.repair()


OPERATIONS["repair"] = _repair


@pytest.mark.parametrize("left", ["remove set aside", "replace landed, index stale"])
def test_kill_at_every_step_of_the_repair_itself(crash_library, tmp_path, left):
    """A library left mid-operation, then its repair killed at every write: the next open still ends in the one
    right state (a half-done remove is undone; a replace whose new folder landed is finished)."""
    template, src = crash_library
    broken = tmp_path / "broken"
    if left == "remove set aside":
        shutil.copytree(template, broken)
        os.replace(broken / "expert_1", broken / ".old-expert_1-1")
        expected = snapshot(template)
    else:
        shutil.copytree(template, broken)
        assert _run(broken, src, "add --replace", kill_at=0) == 0
        expected = snapshot(broken)
        shutil.copytree(template / "expert_1", broken / ".old-expert_1-1")
        shutil.rmtree(broken / "index")
        shutil.copytree(template / "index", broken / "index")
    kill_at = 1
    while True:
        lib_path = tmp_path / f"kill{kill_at}"
        shutil.copytree(broken, lib_path)
        code = _run(lib_path, src, "repair", kill_at, recover=False)
        lib = Library(lib_path, embedder=FakeEmbedder())
        assert snapshot(lib_path) == expected and lib.verify() == [], f"repair killed at write {kill_at}"
        shutil.rmtree(lib_path)
        if code == 0:
            break
        kill_at += 1
    assert kill_at > 3
