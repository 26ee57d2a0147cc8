"""The notebooks run top to bottom offline (executed with nbclient, outputs not stored)."""

from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["editing.ipynb", "inpainting.ipynb"])
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))   # the kernel: the test's own threads
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=1800, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS.parent)}}).execute()
    errors = [o for c in book.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    figures = [o for c in book.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures, "the notebook should show its figures inline"
