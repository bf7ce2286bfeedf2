"""Where the default library and the task data are found."""
from __future__ import annotations

import os
from pathlib import Path

from lorahub_plus.errors import TaskFormatError

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_library() -> Path:
    """$LORAHUB_PLUS_LIBRARY, else the library/ committed beside the package."""
    return Path(os.environ.get("LORAHUB_PLUS_LIBRARY") or REPO_ROOT / "library")


def data_dir() -> Path:
    """$LORAHUB_PLUS_DATA, else ../shared/data/bigbench beside the checkout."""
    return Path(os.environ.get("LORAHUB_PLUS_DATA") or REPO_ROOT.parent / "shared" / "data" / "bigbench")


def resolve_task(name_or_path: str | os.PathLike) -> Path:
    """A task file path as is; a bare task name (e.g. `arithmetic:2_digit_addition`) in data_dir()."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = data_dir() / (str(name_or_path).replace(":", "__") + ".json")
    if candidate.is_file():
        return candidate
    raise TaskFormatError(f"{name_or_path}: no such task file, and no task of that name in {data_dir()}")
