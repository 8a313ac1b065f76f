"""``index.html`` in the run folder: the pictures with the run's config and summary. Self-contained
(no script, no style sheet or font from the network) and only relative links, so it opens offline
and from a copied folder; every call of ``beit viz`` rewrites it."""
from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

REPORT_NAME = "index.html"

STYLE = """body{font-family:sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}pre{background:#f6f6f6;padding:.6em;font-size:.8em;
overflow:auto;max-height:24em}.note{background:#fff6d5;border-left:4px solid #e0b000;padding:.5em .8em}
.small{color:#666;font-size:.85em}"""


@dataclass
class Section:
    title: str
    picture: Path | None = None    # a PNG inside the run folder
    text: str = ""                 # a sentence shown above (or instead of) the picture
    note: bool = False             # show the text as a highlighted statement


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v)
        return s if len(s) < 120 else s[:117] + "..."
    return str(v)


def write_report(run_dir: Path, title: str, sections: list[Section], summary: dict, config_text: str,
                 facts: dict) -> Path:
    """Write ``run_dir/index.html``; pictures are linked by paths relative to it."""
    run_dir = Path(run_dir)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts.append("<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_value(v))}</td></tr>"
                                     for k, v in facts.items()) + "</table>")
    parts.append("<p class='small'>Contents: " + " · ".join(
        f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections)) + "</p>")
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p class='{'note' if s.note else ''}'>{html.escape(s.text)}</p>")
        if s.picture is not None:
            rel = Path(os.path.relpath(s.picture, run_dir)).as_posix()
            parts.append(f"<img src='{html.escape(rel)}' alt='{html.escape(s.title)}'>")
    if summary:
        parts.append("<h2>Summary</h2><table>" + "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_value(v))}</td></tr>" for k, v in summary.items())
            + "</table>")
    parts.append(f"<h2>Config</h2><pre>{html.escape(config_text)}</pre>")
    parts.append(f"<p class='small'>written by <code>beit viz</code> at {time.strftime('%Y-%m-%d %H:%M:%S')}; "
                 "rerun it to refresh.</p></body></html>")
    path = run_dir / REPORT_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path
