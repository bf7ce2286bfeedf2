"""Every notebook runs from top to bottom on the real default model (marked slow: `make test` runs it)."""
import sys

import pytest

from lorahub_plus.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from notebooks import NOTEBOOKS, execute  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_runs(path):
    notebook = execute(path)
    assert any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
