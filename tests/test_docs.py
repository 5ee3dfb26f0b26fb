"""The docs stay in step with the code: README options, notebook code."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from dfo_lora.config import TuneConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_tune_option_and_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    for f in fields(TuneConfig):
        flag = "--" + f.name.replace("_", "-")
        assert f"`{flag}`" in readme, flag


def test_notebook_code_cells_compile():
    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code
    for i, cell in enumerate(code):
        compile("".join(cell["source"]), f"quickstart.ipynb cell {i}", "exec")
