"""The package's shape, held by its own source: imports run one way (no circles, no wing reaching up into
the story), every exception is in the one tree, and the public face is pinned.

The import graph is read with `ast`, imports inside functions included, imports under `if TYPE_CHECKING:`
left out (they never run). `import helpers` / `from helpers import name` is the public face: it resolves
names when they are first used, so it is not an edge; it is the one way a lower layer may call up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "helpers"

# Lowest first. A module may import from its own layer and the ones below it, never from a higher one.
LAYERS = {
    "foundation": ["helpers.errors", "helpers.settings"],  # the vocabulary every layer speaks
    "files": ["helpers.files"],  # model files: catalogue, download, GGUF header and limits
    "machine": ["helpers.machine"],  # this machine: GPU, cores, install, llama-server
    "engine": ["helpers.engine"],  # the model object and what it runs on
    "story": [  # what the notebook's story uses
        "helpers.template_sandbox",
        "helpers.templates",
        "helpers.context_window",
        "helpers.generation",
        "helpers.quantization",
    ],
    "surfaces": ["helpers.ui", "helpers.__main__", "helpers.demo", "helpers.install"],  # what people run
}


def layer_of(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS.values()):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's module map).")


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the helpers modules it imports (at import time or inside functions)."""
    mods = modules(package)
    top = package.name
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for statement in block.body
            for node in ast.walk(statement)
        }
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target not in (module, top):  # `helpers` itself is the lazy public face
                    graph[module].add(target)
                    break
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with one path that shows how."""
    found = []
    for start in sorted(graph):
        path = _path(graph, start, start)
        if path:
            found.append(path)
    return found


def _path(graph, start, goal):
    stack, seen = [(start, [start])], set()
    while stack:
        node, trail = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == goal:
                return trail + [goal]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, trail + [nxt]))
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        if module == "helpers":
            continue
        for target in targets:
            if target != "helpers" and layer_of(target) > layer_of(module):
                wrong.append(f"{module} imports {target}")
    return sorted(wrong)


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_imports_run_downward_only():
    assert upward_imports(import_graph()) == []


def test_the_face_imports_only_the_errors_at_import_time():
    """The face loads its names when they are first used: `import helpers` works before llama-cpp-python is
    installed, and costs nothing but the error classes."""
    assert import_graph()["helpers"] == {"helpers.errors"}
    code = "import sys, helpers; print(sorted(m for m in sys.modules if m.startswith(('helpers', 'llama_cpp'))))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert ast.literal_eval(loaded.stdout) == ["helpers", "helpers.errors"]


def test_the_check_finds_a_circle_and_an_upward_import(tmp_path):
    """The two checks above can fail: a copy of the package with one import added in a function of the
    lowest module (as the loader's `as_model` once pulled the model, and with it the templates, into the
    formatter) shows both."""
    import shutil

    copy = tmp_path / "helpers"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    errors = copy / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from helpers.generation import stream\n")
    graph = import_graph(copy)
    assert any(path[0] == "helpers.errors" for path in circles(graph))
    assert "helpers.errors imports helpers.generation" in upward_imports(graph)


@pytest.mark.parametrize("module", ["helpers.templates", "helpers.settings", "helpers.errors"])
def test_a_story_module_imports_only_what_it_needs(module):
    """The prompt formatter no longer loads the loader (it pulled in 7 helper modules, gguf_check among them)."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('helpers.')))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    names = set(ast.literal_eval(loaded.stdout))
    assert not names & {"helpers.engine.loading", "helpers.files.gguf_check", "helpers.ui.panel"}, names


def test_every_exception_is_in_the_one_tree():
    import helpers
    from helpers import errors

    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(base, ast.Name) and (base.id.endswith("Error") or base.id == "Exception")
                for base in node.bases
            ):
                assert node.name.startswith("_"), f"{path.name}: {node.name} belongs in helpers/errors.py"
    for name in errors.__all__:
        error = getattr(errors, name)
        assert issubclass(error, helpers.HelpersError) and error.__doc__, name
        assert getattr(helpers, name) is error and name in helpers.__all__, f"{name} is not exported by helpers"
        builtin = [b for b in error.__mro__ if b.__module__ == "builtins" and b not in (object, BaseException)]
        assert error is helpers.HelpersError or any(b is not Exception for b in builtin), f"{name}: which builtin?"


# The public face: every name the notebook, the README and the tests use. A name added to `helpers` is added
# here too (a name taken away breaks someone's notebook).
PUBLIC = {
    # models: catalogue, download, loading, serving
    "available_models", "get_model", "offline_model_path", "download_model", "resolve_model",
    "load_model", "unload_model", "as_model", "describe_model", "Model", "connect", "RemoteModel",
    # this machine
    "detect_gpu", "detect_gpus", "describe_gpu", "auto_gpu_layers", "advice", "physical_cores", "install_command",
    "ensure_llama_cpp", "ensure_helper_packages",
    # prompts and generation
    "render_chat", "encode_chat", "available_templates", "template_for", "GenerationSettings", "PRESETS",
    "stream", "generate", "Generation", "GenerationStats",
    # widgets and quantization
    "build_ui", "quant_picker", "fallback_note", "compare_quantizations", "perplexity", "files_to_compare",
    "plot_quantizations",
}  # fmt: skip


def test_the_public_face_is_pinned():
    import helpers
    from helpers import errors

    assert sorted(helpers.__all__) == sorted(PUBLIC | set(errors.__all__))
    for name in helpers.__all__:
        assert getattr(helpers, name) is not None, name
    checked = ast.parse((PACKAGE / "__init__.py").read_text())
    typed = {
        alias.asname or alias.name
        for node in ast.walk(checked)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert set(helpers.__all__) <= typed, "every public name is in the TYPE_CHECKING block, for editors"


def test_the_notebook_uses_only_the_face():
    import json

    nb = json.loads((ROOT / "llama2_textgen.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    python = "\n".join(  # IPython's `!cmd` and `%magic` lines become `pass`, keeping the indentation
        line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("!", "%")) else line
        for line in code.splitlines()
    )
    reached = [
        ast.unparse(node)
        for node in ast.walk(ast.parse(python))
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers."))
        or (isinstance(node, ast.Import) and any(a.name.startswith("helpers.") for a in node.names))
    ]
    assert reached == [], "the notebook imports past helpers' public face"
    import helpers

    used = {
        node.attr
        for node in ast.walk(ast.parse(python))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "helpers"
    }
    assert used <= set(helpers.__all__), used - set(helpers.__all__)
