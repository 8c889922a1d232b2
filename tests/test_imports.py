"""Imports point down: no slimtune import placed inside a function (one there only dodges a cycle, which means
a part is in the wrong place), every part of slimtune has a layer in LAYERS, no part imports one of a layer above
its own, and no parts import each other round in a cycle. Read from the source's syntax tree, so nothing is
imported to check it; scripts/import_graph.py draws the same graph into docs/architecture.md."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "slimtune"
# the command registry imports each command's module when that command runs (cli.py, commands/); the web app's
# entry imports its server, which needs the optional extra slimtune[ui] (FastAPI, uvicorn), only when it starts,
# so a missing extra is a message (tests/ui/test_cli_ui.py), not an ImportError at `import slimtune.ui`
INSIDE_ALLOWED = ("cli.py", "commands/", "ui/__init__.py")
# The layers, top to bottom: a part (a package under slimtune/, or a top-level module without .py) imports parts
# of its own layer or of the layers below it, never one above; within a layer the parts form no cycle.
# - entry points: the package's lazy names, `python -m slimtune`, compare's child process, the verb registry;
# - commands: one module per verb, which may start the web app (commands/ui.py), so ui sits below it;
# - demo and api: what `slimtune demo` runs, through the Python API;
# - recipes: a training run (train.py) and a comparison of runs (compare/);
# - evaluate: scoring and generating with a run, loaded from its folder through trained.py;
# - export: what is written from a run (merge, GGUF, Modelfile, quants, imatrix);
# - trained model: a run's trained model loaded for use (trained.py): its base in the dtype the run trained in,
#   with the model's own code only where trust.py allows it;
# - trust: when a run's or model's own code may run (reads the run-folder marks of runs/);
# - engine: the training loop, memory estimates, the process group;
# - run folder: everything that reads or writes a run folder (runs/: its manifest and lock, adapter and config.yaml,
#   checkpoints, metrics.jsonl, the checks that it is a finished run);
# - methods, kernels and objectives: what is trained (LoRA...), the fast ops of a step, the preference losses;
# - models and outputs: loading a model; where a command may write;
# - inputs: data (records, templates), config, packaged files, the GGUF header reader;
# - errors: slimtune's error types, which import nothing of slimtune.
LAYERS = [
    ("entry points", ("__init__", "__main__", "measured", "cli")),
    ("commands", ("commands",)),
    ("web app", ("ui",)),
    ("demo and api", ("demo", "api")),
    ("recipes", ("train", "compare")),
    ("evaluate", ("evaluate",)),
    ("export", ("export",)),
    ("trained model", ("trained",)),
    ("trust", ("trust",)),
    ("engine", ("engine",)),
    ("run folder", ("runs",)),
    ("methods and kernels", ("methods", "kernels", "objectives")),
    ("models and outputs", ("models", "outputs")),
    ("inputs", ("data", "config", "assets", "gguf_header")),
    ("errors", ("errors",)),
]
LEVEL = {part: i for i, (_, parts) in enumerate(LAYERS) for part in parts}  # 0 = top


def _script():
    """scripts/import_graph.py, which holds the scan (and draws docs/architecture.md from it)."""
    return load_script(ROOT / "scripts" / "import_graph.py")


GRAPH = _script()


def _imports(path: Path):
    """(line, target, inside a function) for every slimtune import in the file."""
    return GRAPH.imports(path, PACKAGE)


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_no_slimtune_import_inside_a_function():
    offenders = [f"slimtune/{_rel(p)}:{line}: {target}" for p in _files()
                 if not _rel(p).startswith(INSIDE_ALLOWED)
                 for line, target, inside in _imports(p) if inside]
    assert not offenders, "imports inside functions (move the code to where it belongs):\n" + "\n".join(offenders)


def _part(name: str) -> str:
    return GRAPH.part(name)


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importer part, imported part) -> the import lines that make the edge."""
    return GRAPH.edges(PACKAGE)


def _cycles(edges) -> list[list[str]]:
    """The parts that import each other round (strongly connected components of more than one part)."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    index, low, stack, found = {}, {}, [], []

    def visit(v):  # Tarjan's algorithm; a few dozen parts, so recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_part_has_a_layer():
    parts = {_part(_rel(p)) for p in _files()}
    assert not parts - set(LEVEL), f"give these a layer in LAYERS: {sorted(parts - set(LEVEL))}"
    assert not set(LEVEL) - parts, f"LAYERS names parts that are gone: {sorted(set(LEVEL) - parts)}"


def test_no_part_imports_a_layer_above_its_own():
    offenders = [f"{line}  ({a}, layer {LAYERS[LEVEL[a]][0]!r}, imports {b}, layer {LAYERS[LEVEL[b]][0]!r})"
                 for (a, b), lines in sorted(_edges().items()) if LEVEL.get(b, -1) < LEVEL.get(a, -1)
                 for line in lines]
    assert not offenders, "upward imports:\n" + "\n".join(offenders)


def test_no_parts_import_each_other_round():
    edges = _edges()
    cycles = _cycles(edges)
    shown = [" <-> ".join(c) + ":\n    " + "\n    ".join(line for (a, b), lines in sorted(edges.items())
                                                         if a in c and b in c for line in lines) for c in cycles]
    assert not cycles, "package cycles:\n" + "\n".join(shown)


@pytest.mark.parametrize("edges, cycles", [
    ({("ui", "commands"): [], ("commands", "ui"): []}, [["commands", "ui"]]),
    ({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}, [["a", "b", "c"]]),
    ({("a", "b"): [], ("b", "c"): [], ("a", "c"): []}, []),
])
def test_the_cycle_check_sees_cycles(edges, cycles):
    assert _cycles(edges) == cycles


def test_the_old_rules_still_hold():
    """The table this file had before LAYERS (issue 29): each importer here sits below every part it names."""
    never = {"data": ("engine", "evaluate", "export", "compare", "cli"),
             "methods": ("engine", "evaluate", "export", "compare", "cli"),
             "kernels": ("engine", "evaluate", "export", "compare", "cli"),
             "engine": ("evaluate", "export", "compare", "cli")}
    assert all(LEVEL[low] > LEVEL[high] for low, highs in never.items() for high in highs)


def test_the_run_folder_sits_below_what_reads_it():
    """runs/ (the run folder's files) is below the engine that trains into it and every part that reads a run,
    and above what it saves (methods) and where its errors come from: the engine passes nothing up to it."""
    readers = ("engine", "trust", "trained", "evaluate", "export", "train", "compare", "ui", "commands")
    assert all(LEVEL["runs"] > LEVEL[part] for part in readers)
    assert all(LEVEL["runs"] < LEVEL[part] for part in ("methods", "models", "config", "errors"))
    assert not [line for (a, b), lines in _edges().items() if a == "runs" and b in readers for line in lines]


def test_the_architecture_drawing_is_current():
    """docs/architecture.md is what scripts/import_graph.py draws from today's imports, with these LAYERS."""
    assert GRAPH.layers() == LAYERS
    drawn = GRAPH.render(LAYERS, _edges())
    assert "UPWARD" not in drawn
    assert (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8") == drawn, \
        "docs/architecture.md is out of date: run `python scripts/import_graph.py`"


def test_the_drawing_shows_an_upward_import():
    drawn = GRAPH.render(LAYERS, {("data", "engine"): ["slimtune/data/x.py:1: slimtune.engine"]})
    assert "    data -. UPWARD .-> engine" in drawn and "Upward imports" in drawn


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
