"""Run the notebook headless, top to bottom, and print what its "demo"-tagged cells printed (`make demo`).

Parameters are injected after the cell tagged "parameters", as papermill does:
`python -m helpers.demo llama2_textgen.ipynb MODEL='"llama-2-13b-chat"' OFFLINE=True`.
"""

from __future__ import annotations

import ast
import sys
import tempfile
from pathlib import Path


def inject_parameters(nb, parameters: dict) -> None:
    import nbformat

    if not parameters:
        return
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", []))
    source = "# injected parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def run_notebook(path: str | Path, parameters: dict | None = None, *, extra_cells=(), timeout: int = 1800):
    """Execute a copy of the notebook in a fresh kernel, in the notebook's folder; return the executed copy."""
    import nbformat
    from jupyter_client import KernelManager
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, parameters or {})
    nb.cells += [nbformat.v4.new_code_cell(source) for source in extra_cells]
    # IPC transport: a local kernel needs no TCP port (and ipykernel 7 warns about unencrypted TCP).
    with tempfile.TemporaryDirectory() as sockets:
        km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(sockets) / "kernel"))
        resources = {"metadata": {"path": str(path.parent.resolve())}}
        try:
            NotebookClient(nb, km=km, timeout=timeout, resources=resources).execute()
        finally:
            if km.has_kernel:  # a kernel manager passed in is not shut down by nbclient
                km.shutdown_kernel()
    return nb


def printed(nb, tag: str) -> str:
    """What the cells with `tag` printed, in order: stdout, and notices on stderr (e.g. "the Hub cannot be reached")."""
    return "".join(
        output.get("text", "")
        for cell in nb.cells
        if tag in cell.get("metadata", {}).get("tags", [])
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )


def main(argv: list[str]) -> int:
    from nbclient.exceptions import CellExecutionError

    notebook, *assignments = argv
    parameters = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        parameters[name] = ast.literal_eval(value)
    try:
        nb = run_notebook(notebook, parameters)
    except CellExecutionError as error:
        print(f"The notebook failed:\n{error}", file=sys.stderr)
        return 1
    print(printed(nb, "demo").rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
