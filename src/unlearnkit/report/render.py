"""The report as a list of sections of blocks, written as one self-contained HTML file (figures embedded as base64
PNG, inline CSS, no script, no external reference) and as Markdown beside its PNG files."""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Para:
    text: str


@dataclass
class Note:
    """Something the reader should know is missing or special, said where it applies (never a blank figure)."""
    text: str


@dataclass
class Code:
    text: str


@dataclass
class Table:
    header: list
    rows: list
    caption: str = ""
    first_column_header: bool = True   # the first cell of each row names it


@dataclass
class Figure:
    file: str          # PNG name in the report folder
    title: str
    caption: str = ""
    number: int = 0


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)
    anchor: str = ""
    level: int = 2


def fmt(v, digits: int = 4) -> str:
    """A number as a reader wants it: 4 significant digits, scientific below 1e-3, '—' for none."""
    if v is None or isinstance(v, bool):
        return "—" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        return f"{v:.{digits}g}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"
    return str(v)


def seconds(v) -> str:
    if v is None:
        return "—"
    v = float(v)
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min" if v < 7200 else f"{v / 3600:.2f} h"


# ---- HTML ---------------------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;color:#1a1a1a;
background:#fff;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.7em;margin:.2em 0 .1em}h2{font-size:1.35em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.1em;margin-top:1.6em}
.meta{color:#555;font-size:.92em}
nav ol{columns:2;column-gap:32px;font-size:.93em;padding-left:1.4em}
.note{background:#fff7e0;border-left:4px solid #E69F00;padding:6px 12px;margin:10px 0;font-size:.93em}
pre{background:#f5f5f5;padding:8px 10px;overflow-x:auto;font-size:.85em;white-space:pre-wrap;word-break:break-all}
.tablewrap{overflow-x:auto;margin:10px 0}
table{border-collapse:collapse;font-size:.86em}
th,td{border:1px solid #d0d0d0;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f0f0f0}.name,.short{text-align:left;white-space:nowrap}
.text{text-align:left;min-width:14em;overflow-wrap:anywhere}
caption{caption-side:top;text-align:left;font-size:.9em;color:#444;padding:2px 0 6px}
figure{margin:18px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#333;margin-top:4px}
code{font-size:.9em}
"""


def _text(s, code: bool = True) -> str:
    """Escaped text; '://' written as an entity so no text reads like a resource reference (it renders the same);
    `backticks` become code, as in the Markdown."""
    out = html.escape(str(s)).replace("://", ":&#47;&#47;")
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out) if code else out


def _table_html(t: Table) -> str:
    out = ['<div class="tablewrap"><table>']
    if t.caption:
        out.append(f"<caption>{_text(t.caption)}</caption>")
    classes = [_cell_class(t, i) for i in range(len(t.header))]
    out.append("<tr>" + "".join(f'<th class="{c}">{_text(h)}</th>' for c, h in zip(classes, t.header)) + "</tr>")
    for row in t.rows:
        out.append("<tr>" + "".join(f'<td class="{c}">{_text(fmt(v), code=False)}</td>' for c, v in zip(classes, row))
                   + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _cell_class(t: Table, i: int) -> str:
    """Numbers right-aligned; names left and unbroken; long text (commands) left and wrapped."""
    if i == 0 and t.first_column_header:
        return "name"
    values = [row[i] for row in t.rows if i < len(row) and row[i] is not None]
    if all(isinstance(v, (int, float)) for v in values):
        return ""
    return "text" if any(len(str(v)) > 40 for v in values) else "short"


def _block_html(b, folder: Path) -> str:
    if isinstance(b, Para):
        return f"<p>{_text(b.text)}</p>"
    if isinstance(b, Note):
        return f'<p class="note">{_text(b.text)}</p>'
    if isinstance(b, Code):
        return f"<pre>{_text(b.text)}</pre>"
    if isinstance(b, Table):
        return _table_html(b)
    if isinstance(b, Figure):
        data = base64.b64encode((folder / b.file).read_bytes()).decode("ascii")
        caption = f"<b>Figure {b.number}.</b> {_text(b.title)}." + (f" {_text(b.caption)}" if b.caption else "")
        return (f'<figure id="fig-{b.number}"><img src="data:image/png;base64,{data}" '
                f'alt="Figure {b.number}: {_text(b.title)}"><figcaption>{caption}</figcaption></figure>')
    raise TypeError(f"unknown block {type(b).__name__}")


def to_html(title: str, meta: list[str], sections: list[Section], folder: Path) -> str:
    figures = [b for s in sections for b in s.blocks if isinstance(b, Figure)]
    toc = "".join(f'<li><a href="#{s.anchor}">{_text(s.title)}</a></li>' for s in sections if s.level == 2)
    figs = "".join(f'<li><a href="#fig-{f.number}">Figure {f.number}: {_text(f.title)}</a></li>' for f in figures)
    parts = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_text(title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{_text(title)}</h1>", *(f'<p class="meta">{_text(m)}</p>' for m in meta),
             f"<nav><h2>Contents</h2><ol>{toc}</ol>",
             f"<h3>Figures ({len(figures)})</h3><ol>{figs}</ol></nav>" if figures else "</nav>"]
    for s in sections:
        h = f"h{s.level}"
        parts.append(f'<section id="{s.anchor}"><{h}>{_text(s.title)}</{h}>')
        parts += [_block_html(b, folder) for b in s.blocks]
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    return "\n".join(p for p in parts if p)


# ---- Markdown -----------------------------------------------------------------------------------------------------

def _md_cell(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def _block_md(b) -> str:
    if isinstance(b, Para):
        return b.text
    if isinstance(b, Note):
        return f"> **Note.** {b.text}"
    if isinstance(b, Code):
        return f"```\n{b.text}\n```"
    if isinstance(b, Table):
        lines = [f"*{b.caption}*", ""] if b.caption else []
        lines.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
        lines.append("|" + "|".join("---:" if _cell_class(b, i) == "" else ":---" for i in range(len(b.header)))
                     + "|")
        lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in b.rows]
        return "\n".join(lines)
    if isinstance(b, Figure):
        return (f"![Figure {b.number}: {b.title}]({b.file})\n\n**Figure {b.number}.** {b.title}."
                + (f" {b.caption}" if b.caption else ""))
    raise TypeError(f"unknown block {type(b).__name__}")


def to_markdown(title: str, meta: list[str], sections: list[Section]) -> str:
    parts = [f"# {title}", *meta, "## Contents",
             "\n".join(f"{i}. [{s.title}](#{s.anchor})" for i, s in enumerate(
                 [s for s in sections if s.level == 2], 1))]
    for s in sections:
        parts.append(f'<a id="{s.anchor}"></a>\n\n{"#" * s.level} {s.title}')
        parts += [_block_md(b) for b in s.blocks]
    return "\n\n".join(parts) + "\n"
