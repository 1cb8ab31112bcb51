"""docs/quickstart.ipynb executes top to bottom (on a small random model; SmolLM2 when slow tests run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import requires

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "quickstart.ipynb"


def _execute(model: str, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("EDGEPATCH_NOTEBOOK_MODEL", model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_quickstart_notebook_runs(monkeypatch):
    requires("bridge")  # (the notebook's random model is a TransformerBridge, like SmolLM2)
    _execute("random:tiny", monkeypatch)


@pytest.mark.slow
def test_quickstart_notebook_on_smollm2(monkeypatch):
    _execute("smollm2-135m", monkeypatch)
