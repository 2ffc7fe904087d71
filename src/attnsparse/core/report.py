"""Self-contained HTML reports: sections of text, tables and PNG figures embedded as data URIs."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attnsparse.core.runs import atomic_write_text


@dataclass
class Section:
    """One report section: a heading, free HTML (already escaped by the caller), tables and figures."""

    title: str
    body_html: str = ""
    tables: list[tuple[list[str], list[list[object]]]] = field(default_factory=list)
    figures: list[tuple[str | Path, str]] = field(default_factory=list)  # (png path, caption)


def table_html(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def figure_html(png: str | Path, caption: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"/>'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #ccc}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:0.9em}
code,pre{background:#f6f6f6;padding:2px 4px}
"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>{section.body_html}")
        parts.extend(table_html(header, rows) for header, rows in section.tables)
        parts.extend(figure_html(png, caption) for png, caption in section.figures)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(path: str | Path, title: str, sections: Sequence[Section]) -> Path:
    """Write a report that opens in any browser with no other files beside it."""
    atomic_write_text(path, render_html(title, sections))
    return Path(path)
