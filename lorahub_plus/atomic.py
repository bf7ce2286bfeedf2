"""Writes that land whole or not at all: build beside the target, then rename over it."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable


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


@contextmanager
def set_aside(path: Path):
    """Moves `path` aside for the block: deleted once the block succeeds, put back if it fails."""
    aside = path.parent / f".old-{path.name}-{time.time_ns()}"
    os.replace(path, aside)
    try:
        yield
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_dir(path: Path, then: Callable[[], None] | None = None):
    """Yields a temporary folder beside `path`; on success it takes `path`'s place.

    An existing `path` is set aside and deleted only once the new folder is in place and `then`
    (say, reindexing what the folder belongs to) has succeeded; otherwise the old folder comes back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        with set_aside(path) if path.exists() else nullcontext():
            os.replace(tmp, path)
            try:
                if then is not None:
                    then()
            except BaseException:
                os.replace(path, tmp)  # one rename, so the old folder always has its place back
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
