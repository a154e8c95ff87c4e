"""The quickstart notebook: saved with its outputs, and runs top to bottom in a real Jupyter kernel."""
from __future__ import annotations

import pytest

from .conftest import ROOT

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def _outputs(cell) -> tuple[str, list[str]]:
    """(everything the cell printed or returned as text, the MIME types of its rich outputs)."""
    text, kinds = "", []
    for o in cell.get("outputs", []):
        text += o.get("text", "") + o.get("data", {}).get("text/plain", "") + o.get("data", {}).get("text/markdown", "")
        kinds += list(o.get("data", {}))
    return text, kinds


def _check(nb) -> None:
    """The key outputs of each step: the plan's table and verdicts, the losses, ROUGE, the report with its plots."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code), "a code cell without outputs"
    text = {c.source.splitlines()[0]: _outputs(c) for c in code}
    printed = "".join(t for t, _ in text.values())
    assert "SAMSum: " in printed
    assert "host peak, 1 rank(s) together" in printed and "no GPU (a CPU run)" in printed  # the CPU plan
    assert "Llama-2-7B LoRA fp16 on one 32 GiB GPU: will not fit" in printed  # the original's V100 verdict
    assert "train loss per step:" in printed and "eval loss before -> after:" in printed
    assert "'rouge1':" in printed and "'rougeL':" in printed
    report_text, report_kinds = next(v for k, v in text.items() if k.startswith("report_md"))
    assert "| eval_loss |" in report_text and report_kinds.count("image/png") == 2  # loss and memory plots
    listing = _outputs(code[-1])[0]
    assert all(name in listing for name in ("adapter_model.safetensors", "loss.png", "memory.png", "report.md"))
    for noise in ("Traceback", "deprecated", "kernels-community", "pin_memory"):
        assert noise not in printed


def test_the_saved_notebook_shows_its_outputs():
    import nbformat

    _check(nbformat.read(NOTEBOOK, as_version=4))


@pytest.mark.slow
def test_quickstart_notebook_executes(real_samsum, monkeypatch, tokenizer):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SAMSUM_DATA_DIR", str(real_samsum))  # how the README's commands find SAMSum
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # checked below: what this run prints, not what the saved file holds
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    _check(nb)
