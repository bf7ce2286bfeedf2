"""Writes that land whole or not at all: build beside the target, then rename over it.

Names beside a target say what a crash left behind, so the next open can finish or undo it
(`Library` does, under its lock):

    .tmp-*          a folder or file still being built: delete it
    .old-NAME-NS    NAME set aside: if NAME exists the new one landed (delete the old),
                    otherwise the operation did not finish (rename it back)
    .trash-*        being deleted: delete it
    .pending-NAME   the next NAME of a multi-file write: if the owner's `.commit` marker exists,
                    rename it over NAME (roll forward), otherwise delete it (roll back)

Deleting goes through a rename to `.trash-*` first, so a half-deleted folder never looks whole.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

from lorahub_plus.errors import LoraHubPlusError, OutputPathError
from lorahub_plus.library.readers import read_json

ASIDE = re.compile(r"^\.old-(?P<name>.+)-\d+$")
LEFTOVER = re.compile(r"^\.(tmp|trash|old|pending)-")
COMMIT = ".commit"


@contextmanager
def atomic_file(path: Path):
    """Yields a temporary path beside `path`; on success it replaces `path` in one rename."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def discard(path: Path) -> None:
    """Delete a file or folder: one rename to `.trash-*`, then the slow part."""
    trash = path.parent / f".trash-{path.name}-{time.time_ns()}"
    os.replace(path, trash)
    remove_tree(trash)


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def set_aside(path: Path):
    """Moves `path` aside for the block: discarded once the block succeeds, put back if it fails."""
    aside = path.parent / f".old-{path.name}-{time.time_ns()}"
    os.replace(path, aside)
    try:
        yield
    except BaseException:
        os.replace(aside, path)
        raise
    discard(aside)


@contextmanager
def atomic_dir(path: Path, then: Callable[[], None] | None = None, guard: Callable[[], None] | None = None):
    """Yields a temporary folder beside `path`; on success it takes `path`'s place.

    An existing `path` is set aside and discarded only once the new folder is in place and `then`
    (say, reindexing what the folder belongs to) has succeeded; otherwise the old folder comes back.
    `guard` runs just before the swap (a user's output folder is checked again there: files may have
    appeared in it while the work ran).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if guard is not None:
            guard()
        with set_aside(path) if path.exists() else nullcontext():
            os.replace(tmp, path)
            try:
                if then is not None:
                    then()
            except BaseException:
                os.replace(path, tmp)  # one rename, so the old folder always has its place back
                raise
    finally:
        if tmp.exists():
            remove_tree(tmp)


OUTPUT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md", "report.json", "loss.png",
                          "card.json", "embeddings.safetensors"})
"""Every file an output folder of ours (a composed adapter, a trained expert) may hold."""


STAGING = ".build"
"""A library's folder for experts being built (`library build`); no library write touches it."""


def check_output_dir(path: Path, overwrite: bool = False, markers: tuple[str, ...] = ("report.json", "card.json")) -> Path:
    """Refuse, before any work, an output folder that would lose a user's files or cannot be written.

    An existing non-empty folder is replaced only with `overwrite`, and only if lorahub-plus wrote it:
    it holds nothing but OUTPUT_FILES, and one of `markers` is a JSON object with a
    `lorahub_plus_version` field. A folder inside a library is never an output (use `library add`).
    """
    path = Path(path)
    for full in {Path(os.path.abspath(path)), Path(os.path.realpath(path))}:  # as written, and through symlinks
        for folder in full.parents:
            if (folder / "library.json").exists() and full.relative_to(folder).parts[0] != STAGING:
                raise OutputPathError(f"{path}: `out` lies inside a library, whose writes replace its folders "
                                      "whole; write elsewhere and use `library add`")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: `out` is an existing file; give a folder path that does not exist yet")
    entries = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if entries:
        if not overwrite:
            raise OutputPathError(f"{path}: `out` is a folder that is not empty; choose a new path, or pass "
                                  "overwrite (`--overwrite`) to replace an earlier lorahub-plus output")
        ours = False
        for marker in markers:
            try:
                ours = ours or "lorahub_plus_version" in read_json(path / marker)
            except LoraHubPlusError:
                continue
        if not ours or entries - OUTPUT_FILES:
            raise OutputPathError(f"{path}: `out` holds files that lorahub-plus did not write "
                                  f"({sorted(entries - OUTPUT_FILES) or 'no ' + ' or '.join(markers) + ' of ours'}); "
                                  "it is never replaced, even with overwrite")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    except OSError as e:
        raise OutputPathError(f"{path}: `out` cannot be written ({e.strerror or e} in {parent})") from e
    return path
