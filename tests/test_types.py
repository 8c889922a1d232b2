"""Type hints: the share of slimtune's function parameters that carry an annotation stays at THRESHOLD or above.

Read from each file's syntax tree, so nothing is imported. A parameter is every name a def takes except `self`
and `cls` in first place; `*args` and `**kwargs` count as parameters (annotated or not); the bare `*` and `/`
markers are not parameters. Return annotations are counted separately and only reported."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slimtune"
THRESHOLD = 0.90


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    a = fn.args
    named = a.posonlyargs + a.args
    if named and named[0].arg in ("self", "cls"):
        named = named[1:]
    return named + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x is not None]


def count(text: str) -> tuple[int, int, int, int]:
    """(annotated parameters, parameters, functions with a return annotation, functions) in one source."""
    typed = params = returns = functions = 0
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found = _parameters(node)
            params += len(found)
            typed += sum(p.annotation is not None for p in found)
            functions += 1
            returns += node.returns is not None
    return typed, params, returns, functions


def _part(path: Path) -> str:
    """methods/lora.py -> methods; cli.py -> cli."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def shares() -> dict[str, tuple[int, int, int, int]]:
    """Part of slimtune -> its counts (see count), plus "slimtune" for the whole package."""
    out: dict[str, list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found = count(path.read_text(encoding="utf-8"))
        for key in (_part(path), "slimtune"):
            out[key] = [x + y for x, y in zip(out.get(key, [0, 0, 0, 0]), found)]
    return {k: tuple(v) for k, v in out.items()}


def report(table: dict[str, tuple[int, int, int, int]]) -> str:
    rows = [f"{k:14} params {t}/{p} = {t / max(p, 1):.0%}   returns {r}/{f} = {r / max(f, 1):.0%}"
            for k, (t, p, r, f) in sorted(table.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1)) if p]
    return "\n".join(rows)


def test_the_count_sees_each_kind_of_parameter():
    text = ("class A:\n    def f(self, a: int, b, *args, c: str = '', **kw: int) -> None: ...\n"
            "    @classmethod\n    def g(cls, *, d): ...\n"
            "def h(x, /, y: int) -> int: ...\nasync def k(): ...\n")
    assert count(text) == (4, 8, 2, 4)


def test_the_walk_reaches_every_part():
    table = shares()
    assert {"methods", "kernels", "engine", "cli", "config", "slimtune"} <= set(table)
    assert table["slimtune"][1] > 1000


def test_parameter_hints_reach_the_threshold():
    table = shares()
    typed, params, _, _ = table["slimtune"]
    assert typed / params >= THRESHOLD, \
        f"{typed}/{params} = {typed / params:.1%} of parameters are annotated, below {THRESHOLD:.0%}:\n" + report(table)
