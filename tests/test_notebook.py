"""The quickstart notebook runs top to bottom in a real Jupyter kernel."""
from __future__ import annotations

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_quickstart_notebook_executes(real_samsum, monkeypatch, tokenizer):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SAMSUM_DATA_DIR", str(real_samsum))
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "losses per step:" in printed and "memory records:" in printed
    result = next(o for o in nb.cells[-1].outputs if o["output_type"] == "execute_result")
    assert "adapter_model.safetensors" in result["data"]["text/plain"]
