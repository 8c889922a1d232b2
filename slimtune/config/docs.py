"""Field docs a tool can read: each field's docstring, type, default and allowed values (`--help-config`)."""
from __future__ import annotations

import ast
import functools
import inspect
import json
import textwrap

from .checks import CHOICES, RANGES
from .convert import types_of
from .fields import Config


@functools.cache
def field_docs(cls) -> dict[str, tuple[str, str]]:
    """{field: (type as written, doc)} of a config dataclass, read from its source: the string literal
    under each field is its documentation (as litgpt's args), so --help-config prints what the code says
    and nothing is written twice."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                else ""
            docs[node.target.id] = (ast.unparse(node.annotation), " ".join(str(text).split()))
    return docs


def _allowed(dotted: str) -> str:
    """'; one of: a, b' or '; range [0, inf)' for a key with CHOICES or RANGES, else ''."""
    if dotted in CHOICES:
        return "; one of: " + ", ".join(CHOICES[dotted])
    spec = RANGES.get(dotted)
    if isinstance(spec, tuple):
        return "; one of: " + ", ".join(map(str, spec))
    return f"; range {spec}" if spec else ""


def explain() -> str:
    """Every config key, dotted, with its type, default, allowed values and doc (`slimtune train --help-config`)."""
    lines = []
    for section, (_, about) in field_docs(Config).items():
        cls = types_of(Config)[section]
        defaults = cls()
        lines += ["", f"{section}: {about}"]
        for key, (tp, doc) in field_docs(cls).items():
            dotted = f"{section}.{key}"
            lines.append(f"  {dotted} ({tp}, default {json.dumps(getattr(defaults, key))}{_allowed(dotted)})")
            lines.append(textwrap.fill(doc, 116, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines[1:])

