"""Project hygiene: lint, and a committed notebook with no outputs, execution counts or widget state."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "llama2_textgen.ipynb"


def ruff(*args):
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_and_format_including_the_notebook():
    lint = ruff("check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = ruff("format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    assert "llama2_textgen.ipynb" not in fmt.stdout


def test_notebook_is_committed_clean():
    nb = json.loads(NOTEBOOK.read_text())
    assert "widgets" not in nb["metadata"]
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"]
        assert "widgets" not in cell.get("metadata", {})


def test_notebook_cells_are_short_calls():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for cell in code:
        lines = [line for line in "".join(cell["source"]).splitlines() if line.strip()]
        is_parameters = "parameters" in cell.get("metadata", {}).get("tags", [])  # data, one line each
        assert len(lines) <= (20 if is_parameters else 12), lines
        assert not any(line.startswith(("def ", "class ")) for line in lines), lines
    tags = [t for c in code for t in c.get("metadata", {}).get("tags", [])]
    assert tags.count("parameters") == 1
