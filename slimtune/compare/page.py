"""compare.html: one self-contained page (no file beside it needed): the table and the charts, the
images inlined as base64 data URIs, so it can be mailed or opened from anywhere."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from .table import cells, legend

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f2f2}td{white-space:nowrap}td:first-child,td:last-child{text-align:left}
td:last-child{white-space:normal}tr.failed td{color:#a00}p.legend{font-size:13px;color:#555;max-width:1100px}
.charts{display:flex;flex-wrap:wrap;gap:8px}.chart{flex:0 1 560px}.chart img{width:100%}
h2{font-size:16px;margin:12px 0 4px}"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<div class="chart"><h2>{html.escape(alt)}</h2><img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{data}"></div>')


def render(rows: list[dict], meta: dict, charts: dict[str, Path]) -> str:
    header, body = cells(rows, meta.get("metric"))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = []
    for row, c in zip(rows, body):
        cls = ' class="failed"' if row.get("status") == "failed" else ""
        trs.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(x)}</td>" for x in c) + "</tr>")
    imgs = "".join(_img(p, title) for title, p in charts.items() if p.is_file())
    title = f"slimtune compare: {meta.get('config', '')}"
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>"
            f"<p class=\"legend\">{html.escape(legend(meta))}</p><div class=\"charts\">{imgs}</div></body></html>\n")


def write(out: Path, rows: list[dict], meta: dict, charts: dict[str, Path]) -> Path:
    path = out / "compare.html"
    path.write_text(render(rows, meta, charts), encoding="utf-8")
    return path
