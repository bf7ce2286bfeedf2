"""Writes that land whole or not at all: build beside the target, then rename over it."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


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
def atomic_dir(path: Path):
    """Yields a temporary folder beside `path`; on success it takes `path`'s place.

    An existing `path` is renamed aside first and deleted only once the new folder is in place;
    on any failure the old folder comes back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    aside = path.parent / f".old-{path.name}-{time.time_ns()}"
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            os.replace(path, aside)
        os.replace(tmp, path)
    except BaseException:
        if aside.exists() and not path.exists():
            os.replace(aside, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
