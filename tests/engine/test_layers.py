"""Imports point down: the engine's loop imports no evaluation (the caller passes it in), and assets.py and
models.py do not import each other."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import slimtune

from slimtune.engine.loop import fit


def _loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('slimtune')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_loop_loads_no_evaluation():
    loaded = _loaded_after("slimtune.engine.loop")
    assert "slimtune.engine.loop" in loaded and "slimtune.data.stream" in loaded
    assert not [m for m in loaded if m.startswith("slimtune.evaluate")]


def _imported(path: Path) -> set[str]:
    """Every slimtune module a file imports, at module level or inside a function (relative, as `.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            found |= {f"{node.module}" if node.module else a.name for a in node.names}
    return found


def test_assets_imports_nothing_of_slimtune_and_models_builds_on_it():
    root = Path(slimtune.__file__).parent
    assert _imported(root / "assets.py") <= {"errors"}  # errors.py is the leaf every module may use
    assert "assets" in _imported(root / "models.py")  # one way: models builds on assets


def test_fit_with_held_records_needs_an_evaluate_callable():
    with pytest.raises(ValueError, match="held-out records need an evaluate callable"):
        fit(None, [], [object()], None, 0, "unused", "cpu")


def _function_level_imports(path: Path) -> list[str]:
    """slimtune modules a file imports inside a function (where a cycle once forced them)."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [f"{fn.name}: .{node.module or ''}" for node in ast.walk(fn)
                      if isinstance(node, ast.ImportFrom) and node.level]
    return found


def test_engine_kernels_and_loading_import_slimtune_at_module_level():
    root = Path(slimtune.__file__).parent
    files = [*(root / "engine").glob("*.py"), *(root / "kernels").glob("*.py"), root / "data" / "stream.py",
             root / "assets.py", root / "models.py", root / "methods" / "lora.py", root / "evaluate" / "report.py",
             root / "evaluate" / "perplexity.py"]
    assert {str(f.relative_to(root)): _function_level_imports(f) for f in files if _function_level_imports(f)} == {}
