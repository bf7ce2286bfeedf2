"""Execute every notebook under notebooks/ in its own folder; with --write, save the outputs back.

    python scripts/notebooks.py [--write] [NAME.ipynb ...]
`make notebooks` writes them (commit the result, so a reader sees outputs without running anything);
tests/test_notebooks.py executes them without writing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(path: Path, timeout: int = 900):
    """The executed notebook; a failing cell raises nbclient's CellExecutionError with its traceback."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    notebook = nbformat.from_dict(nbformat.validator.normalize(notebook)[1])  # cell ids, as nbformat 5 wants
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return notebook


def main() -> None:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument("--write", action="store_true", help="save the outputs into the notebooks")
    args = parser.parse_args()
    for path in [NOTEBOOKS / n for n in args.names] or sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = execute(path)
        if args.write:
            nbformat.write(notebook, path)
        print(f"{path.name}: ok", file=sys.stderr)


if __name__ == "__main__":
    main()
