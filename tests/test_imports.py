"""Imports point down: no slimtune import placed inside a function (one there only dodges a cycle, which means
a part is in the wrong place), and the layers below never import the ones above them. Read from the source's
syntax tree, so nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slimtune"
# the command registry imports each command's module when that command runs (cli.py, commands/); the web app's
# entry imports its server, which needs the optional extra slimtune[ui] (FastAPI, uvicorn), only when it starts,
# so a missing extra is a message (tests/ui/test_cli_ui.py), not an ImportError at `import slimtune.ui`
INSIDE_ALLOWED = ("cli.py", "commands/", "ui/__init__.py")
# importer folder -> the parts of slimtune it must never import
NEVER = {
    "data": ("engine", "evaluate", "export", "compare", "cli"),
    "methods": ("engine", "evaluate", "export", "compare", "cli"),
    "kernels": ("engine", "evaluate", "export", "compare", "cli"),
    "engine": ("evaluate", "export", "compare", "cli"),
}


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _targets(node: ast.AST, path: Path) -> list[str]:
    """The dotted slimtune modules (or names in them) an import statement reaches; [] for other packages."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "slimtune"]
    if node.level == 0:
        return [node.module] if (node.module or "").split(".")[0] == "slimtune" else []
    base = _module(path)
    package = base if path.name == "__init__.py" else base[:-1]
    root = package[: len(package) - (node.level - 1)]
    if node.module:
        return [".".join(root + [node.module])]
    return [".".join(root + [a.name]) for a in node.names]  # `from . import x`: x may be a module


def _imports(path: Path):
    """(line, target, inside a function) for every slimtune import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(node: ast.AST, inside: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, path):
                    yield child.lineno, target, inside
            yield from walk(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    yield from walk(tree, False)


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_no_slimtune_import_inside_a_function():
    offenders = [f"slimtune/{_rel(p)}:{line}: {target}" for p in _files()
                 if not _rel(p).startswith(INSIDE_ALLOWED)
                 for line, target, inside in _imports(p) if inside]
    assert not offenders, "imports inside functions (move the code to where it belongs):\n" + "\n".join(offenders)


def test_lower_layers_never_import_upper_ones():
    offenders = []
    for p in _files():
        layer = _rel(p).split("/")[0]
        for line, target, _ in _imports(p):
            part = target.split(".")[1] if "." in target else ""
            if part in NEVER.get(layer, ()):
                offenders.append(f"slimtune/{_rel(p)}:{line}: {layer}/ imports {target}")
    assert not offenders, "upward imports:\n" + "\n".join(offenders)


def test_assets_and_models_do_not_import_each_other():
    """models finds the embedded model through assets; assets (packaged files) knows nothing of models."""
    found = [t for _, t, _ in _imports(PACKAGE / "assets.py")]
    assert not [t for t in found if t.startswith("slimtune.models")], found


@pytest.mark.parametrize("source, inside, target", [
    ("def f():\n    from ..engine import loop\n", True, "slimtune.engine"),
    ("from . import stream\n", False, "slimtune.data.stream"),
    ("import slimtune.cli\n", False, "slimtune.cli"),
    ("import torch\n", None, None),
])
def test_the_scan_sees_imports(tmp_path, monkeypatch, source, inside, target):
    """The checks above would pass on a scan that saw nothing: this one feeds it known imports."""
    folder = tmp_path / "slimtune" / "data"
    folder.mkdir(parents=True)
    (folder / "probe.py").write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path / "slimtune")
    found = [(t, i) for _, t, i in _imports(folder / "probe.py")]
    assert found == ([] if target is None else [(target, inside)])
