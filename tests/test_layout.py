"""The package's size rules (issue 17): no file under slimtune/ over 400 lines, no function or method over 60.

Each failure lists every offender with its size, so a split starts from the list."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slimtune"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources() -> list[tuple[str, str]]:
    return [(path.relative_to(PACKAGE.parent).as_posix(), path.read_text(encoding="utf-8"))
            for path in sorted(PACKAGE.rglob("*.py"))]


def function_sizes(text: str) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines from `def` to the last line of the body) of every function and
    method, nested ones included; decorators are not counted."""
    out = []

    def walk(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((prefix + child.name, child.lineno, child.end_lineno - child.lineno + 1))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(text), "")
    return out


def test_function_sizes_are_measured_from_def_to_the_last_line():
    text = "class A:\n    def f(self):\n        x = 1\n\n        return x\n\n\ndef g():\n    def h():\n        pass\n"
    assert function_sizes(text) == [("A.f", 2, 4), ("g", 8, 3), ("g.h", 9, 2)]


def test_the_walk_reaches_every_module():
    files = dict(_sources())
    assert {"slimtune/cli.py", "slimtune/config/fields.py", "slimtune/engine/memory.py"} <= set(files)
    assert len(files) > 50 and all(len(files[f]) > 0 for f in ("slimtune/cli.py", "slimtune/engine/loop.py"))


def test_no_file_over_400_lines():
    long = [f"{name}: {len(text.splitlines())} lines" for name, text in _sources()
            if len(text.splitlines()) > MAX_FILE_LINES]
    assert long == [], "files over 400 lines:\n" + "\n".join(long)


def test_no_function_over_60_lines():
    long = [f"{name}:{line} {func}: {size} lines" for name, text in _sources()
            for func, line, size in function_sizes(text) if size > MAX_FUNCTION_LINES]
    assert long == [], "functions over 60 lines:\n" + "\n".join(long)
