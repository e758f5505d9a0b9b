"""The report page: one HTML file with its CSS, script and images inline, so it opens from file:// offline.

Every piece of text from the data goes through `esc` (HTML) or `json_script` (JSON safe inside a script
element); figures are embedded as base64 PNG data URIs.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d1d1f;
       background: #fafafa; }
header { background: #1f2a44; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 4px 0 0; color: #c9d1e3; font-size: 12px; }
nav { padding: 8px 28px; background: #eef1f6; border-bottom: 1px solid #d5dae3; position: sticky; top: 0; z-index: 5; }
nav a { margin-right: 14px; color: #1f2a44; text-decoration: none; font-weight: 600; }
main { padding: 8px 28px 40px; max-width: 1500px; }
section { margin: 26px 0; }
h2 { border-bottom: 2px solid #1f2a44; padding-bottom: 4px; }
h3 { margin-bottom: 6px; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e1e4ea; background: #fff; display: block; }
figcaption { color: #555; font-size: 12.5px; margin-top: 4px; max-width: 1000px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; background: #fff; }
th, td { border: 1px solid #d5dae3; padding: 3px 8px; text-align: right; }
th { background: #eef1f6; }
td.text, th.text { text-align: left; }
tr.head-row { cursor: pointer; }
tr.head-row:hover { background: #fff6d5; }
.note { color: #555; font-size: 12.5px; }
.heatmap { position: relative; display: inline-block; max-width: 100%; }
.heatmap img { cursor: crosshair; border: none; }
.marker { position: absolute; border: 2px solid #ff2d55; box-sizing: border-box; pointer-events: none; display: none; }
.picked { font-size: 13px; min-height: 1.4em; color: #1f2a44; }
#tip { position: fixed; pointer-events: none; background: rgba(20, 24, 33, .92); color: #fff; padding: 5px 8px;
       border-radius: 4px; font-size: 12px; white-space: pre; display: none; z-index: 10; }
.samples { display: flex; flex-wrap: wrap; gap: 10px; }
.sample { background: #fff; border: 1px solid #e1e4ea; padding: 8px; max-width: min(100%, 1100px); }
.sample.correct { border-left: 5px solid #55A868; }
.sample.wrong { border-left: 5px solid #C44E52; }
.qa { font-size: 13px; margin: 4px 0 0; }
.qa b { display: inline-block; min-width: 78px; }
"""

SCRIPT = r"""
(function () {
  var tip = document.getElementById('tip');
  var maps = [];
  function fmt(v) { return (v === null || v === undefined) ? 'n/a' : Number(v).toFixed(3); }
  function describe(data, layer, head) {
    var i = layer * data.heads + head;
    var lines = ['layer ' + layer + ', head ' + head,
                 'W ' + fmt(data.w[i]) + '   C ' + fmt(data.c[i]),
                 'score ' + fmt(data.score[i]) + '   rank ' + data.rank[i] + (data.visual[i] ? '   visual head' : '')];
    if (data.pointing && data.pointing[i] !== null) { lines.push('pointing ' + fmt(data.pointing[i])); }
    return lines.join('\n');
  }
  function cellAt(map, ev) {
    var r = map.img.getBoundingClientRect();
    var fx = (ev.clientX - r.left) / r.width, fy = (ev.clientY - r.top) / r.height;
    for (var p = 0; p < map.data.panels.length; p++) {
      var e = map.data.panels[p].extent;
      if (fx >= e[0] && fx < e[2] && fy >= e[1] && fy < e[3]) {
        return {layer: Math.floor((fy - e[1]) / (e[3] - e[1]) * map.data.layers),
                head: Math.floor((fx - e[0]) / (e[2] - e[0]) * map.data.heads)};
      }
    }
    return null;
  }
  function highlight() {
    var m = /head=(\d+)\.(\d+)/.exec(decodeURIComponent(location.hash));
    maps.forEach(function (map) {
      var d = map.data, ok = m && +m[1] < d.layers && +m[2] < d.heads;
      map.markers.forEach(function (marker, p) {
        if (!ok) { marker.style.display = 'none'; return; }
        var e = d.panels[p].extent, cw = (e[2] - e[0]) / d.heads, ch = (e[3] - e[1]) / d.layers;
        marker.style.left = (100 * (e[0] + cw * +m[2])) + '%';
        marker.style.top = (100 * (e[1] + ch * +m[1])) + '%';
        marker.style.width = (100 * cw) + '%';
        marker.style.height = (100 * ch) + '%';
        marker.style.display = 'block';
      });
      map.picked.textContent = ok ? 'selected: ' + describe(d, +m[1], +m[2]).replace(/\n/g, ' | ') : '';
    });
  }
  document.querySelectorAll('.heatmap').forEach(function (box) {
    var data = JSON.parse(document.getElementById(box.getAttribute('data-json')).textContent);
    var map = {data: data, img: box.querySelector('img'), markers: [],
               picked: document.getElementById(box.getAttribute('data-picked'))};
    data.panels.forEach(function () {
      var marker = document.createElement('div');
      marker.className = 'marker';
      box.appendChild(marker);
      map.markers.push(marker);
    });
    map.img.addEventListener('mousemove', function (ev) {
      var cell = cellAt(map, ev);
      if (!cell) { tip.style.display = 'none'; return; }
      tip.textContent = describe(data, cell.layer, cell.head);
      tip.style.left = (ev.clientX + 14) + 'px';
      tip.style.top = (ev.clientY + 14) + 'px';
      tip.style.display = 'block';
    });
    map.img.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
    map.img.addEventListener('click', function (ev) {
      var cell = cellAt(map, ev);
      if (cell) { location.hash = 'head=' + cell.layer + '.' + cell.head; }
    });
    maps.push(map);
  });
  document.querySelectorAll('tr.head-row').forEach(function (row) {
    row.addEventListener('click', function () { location.hash = 'head=' + row.getAttribute('data-head'); });
  });
  window.addEventListener('hashchange', highlight);
  highlight();
  document.body.setAttribute('data-ready', String(maps.length));
})();
"""


@dataclass
class Section:
    """One titled part of the page; `body` is HTML already escaped by the helpers here."""

    anchor: str
    title: str
    body: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The section as HTML."""
        return f'<section id="{esc(self.anchor)}"><h2>{esc(self.title)}</h2>\n' + "\n".join(self.body) + "</section>"


def esc(text: Any) -> str:
    """HTML-escape any value (quotes too, so it is safe in attributes)."""
    return html.escape("" if text is None else str(text), quote=True)


def json_script(element_id: str, data: Any) -> str:
    """A JSON data block that cannot end its script element early, whatever strings it holds."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def data_uri(path: str | Path) -> str:
    """A PNG file as a base64 data URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure(path: str | Path, alt: str, caption: str | None = None) -> str:
    """A figure with its PNG embedded and a caption (plain text, escaped)."""
    cap = f"<figcaption>{esc(caption)} <a href=\"{esc(Path(path).name)}\">PNG</a></figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(path)}" alt="{esc(alt)}">{cap}</figure>'


def heatmap_figure(path: str | Path, alt: str, element_id: str, data: Mapping[str, Any], caption: str) -> str:
    """A heatmap figure with hover read-out: the PNG, its cell data as JSON and a line for the clicked head."""
    return (f'<figure><div class="heatmap" data-json="{esc(element_id)}-data" data-picked="{esc(element_id)}-picked">'
            f'<img src="{data_uri(path)}" alt="{esc(alt)}"></div>'
            f'<div class="picked" id="{esc(element_id)}-picked"></div>'
            f'<figcaption>{esc(caption)} <a href="{esc(Path(path).name)}">PNG</a></figcaption></figure>'
            + json_script(f"{element_id}-data", data))


def _cell(value: Any, fmt: Callable[[Any], str] | None) -> tuple[str, bool]:
    if fmt is not None:
        return fmt(value), False
    if isinstance(value, float):
        return ("n/a" if math.isnan(value) else f"{value:.3f}"), False
    if isinstance(value, (bool, int)):
        return str(value), False
    return str(value), True


def table(frame: pd.DataFrame, formats: Mapping[str, Callable[[Any], str]] | None = None,
          row_attrs: Callable[[Any], Mapping[str, str]] | None = None) -> str:
    """A DataFrame as an escaped HTML table; `row_attrs(row)` adds attributes (class, data-*) to each row."""
    formats = formats or {}
    texts = {c for c in frame.columns if c not in formats and len(frame) and _cell(frame[c].iloc[0], None)[1]}
    head = "".join(f'<th class="text">{esc(c)}</th>' if c in texts else f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        attrs = "".join(f' {esc(k)}="{esc(v)}"' for k, v in (row_attrs(row) if row_attrs else {}).items())
        cells = []
        for column, value in zip(frame.columns, row, strict=True):
            text, is_text = _cell(value, formats.get(column))
            cells.append(f'<td class="text">{esc(text)}</td>' if is_text else f"<td>{esc(text)}</td>")
        rows.append(f"<tr{attrs}>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def paragraph(text: str, cls: str = "note") -> str:
    """A paragraph of plain (escaped) text."""
    return f'<p class="{esc(cls)}">{esc(text)}</p>'


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document: header, navigation, sections, inline CSS and script; no external resource."""
    nav = "".join(f'<a href="#{esc(s.anchor)}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(s.render() for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header><nav>{nav}</nav>"
        f"<main>{body}</main><div id=\"tip\"></div><script>{SCRIPT}</script></body></html>\n"
    )
