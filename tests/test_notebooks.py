"""Every notebook runs from top to bottom on the real default model (marked slow: `make test` runs it)."""
import sys

import pytest

from lorahub_plus.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from notebooks import NOTEBOOKS, execute  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_runs(path):
    """Every cell that prints in the committed notebook prints again, and none prints an error."""
    import nbformat

    committed = [bool(c.get("outputs")) for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    run = [c.get("outputs", []) for c in execute(path).cells if c.cell_type == "code"]
    assert any(committed) and all(out for out, printed in zip(run, committed) if printed)
    assert not any(o.get("output_type") == "error" for out in run for o in out)
