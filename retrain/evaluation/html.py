"""What the HTML pages share (the evaluation report, the label-error page): escaping, number
formats, the style sheet, and the figure of one image with its caption."""

from __future__ import annotations

import html
import math
from urllib.parse import quote

def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _href(relative: str) -> str:
    return html.escape(quote(relative, safe="/"), quote=True)


def _percent(value) -> str:
    value = float(value)
    return "–" if math.isnan(value) else f"{value * 100:.1f}%"


def _number(value, digits: int = 3) -> str:
    value = float(value)
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #212529;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 20px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header .model { margin: 0; color: #495057; overflow-wrap: anywhere; }
header .model code { background: #e9ecef; padding: 1px 5px; border-radius: 4px; }
.kind { display: inline-block; margin-left: 6px; padding: 1px 8px; border-radius: 10px; background: #1c7ed6;
  color: #fff; font-size: 12px; vertical-align: 2px; }
.when { color: #868e96; font-size: 13px; margin: 4px 0 0; }
nav { margin: 14px 0 0; font-size: 14px; }
nav a { margin-right: 14px; }
section { background: #fff; border-radius: 10px; padding: 18px 20px; margin-top: 18px;
  box-shadow: 0 1px 2px rgba(0,0,0,.06), 0 1px 8px rgba(0,0,0,.04); }
h2 { margin: 0 0 12px; font-size: 19px; }
a { color: #1864ab; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
.card { border: 1px solid #e9ecef; border-radius: 8px; padding: 10px 14px; }
.card .value { font-size: 26px; font-weight: 650; }
.card .label { color: #6c757d; font-size: 13px; }
.card.good .value { color: #2b8a3e; } .card.fair .value { color: #e67700; } .card.poor .value { color: #c92a2a; }
.figure { overflow-x: auto; text-align: center; }
.figure img { max-width: 100%; height: auto; display: inline-block; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { padding: 6px 10px; border-bottom: 1px solid #e9ecef; text-align: left; vertical-align: middle; }
th { color: #495057; font-weight: 600; background: #f8f9fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { overflow-wrap: anywhere; }
td.index { color: #adb5bd; width: 1%; }
tr.worst td { background: #fff0f0; }
tr.worst td.name::after { content: "lowest recall"; margin-left: 8px; padding: 1px 7px; border-radius: 9px;
  background: #e03131; color: #fff; font-size: 11px; white-space: nowrap; }
.bar { display: inline-block; width: 70px; height: 8px; margin-left: 8px; border-radius: 4px; background: #e9ecef;
  vertical-align: middle; overflow: hidden; }
.bar span { display: block; height: 100%; background: #4dabf7; }
tr.worst .bar span { background: #fa5252; }
.note { color: #6c757d; font-size: 13px; margin: 0 0 12px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 14px; }
figure.mistake { margin: 0; border: 1px solid #e9ecef; border-radius: 8px; overflow: hidden; background: #fff; }
.thumb { display: flex; align-items: center; justify-content: center; background: #f1f3f5; }
.thumb img { max-width: 100%; max-height: 100%; display: block; }
.thumb .missing { color: #868e96; font-size: 13px; padding: 8px; text-align: center; }
figcaption { padding: 8px 10px 10px; font-size: 13px; }
figcaption .path { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 11.5px;
  color: #495057; overflow-wrap: anywhere; margin-bottom: 6px; }
figcaption .row { display: flex; justify-content: space-between; gap: 8px; }
figcaption .row span:first-child { color: #6c757d; }
figcaption .row span:last-child { text-align: right; overflow-wrap: anywhere; }
.pred { color: #c92a2a; font-weight: 600; }
.conf { display: inline-block; margin-top: 6px; padding: 1px 8px; border-radius: 10px; background: #fff4e6;
  color: #d9480f; font-weight: 600; }
.skipped td.path { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
  overflow-wrap: anywhere; }
ul.files { margin: 0; padding-left: 20px; }
.empty { color: #6c757d; margin: 0; }
"""


def _quality(value: float) -> str:
    return "good" if value >= 0.9 else "fair" if value >= 0.7 else "poor"


def image_figure(thumbnail: str | None, alt: str, problem: str | None, path: str, rows: list[tuple[str, str, bool]],
                 badge: str, height: int) -> str:
    """One image card: the thumbnail (or why there is none), its path, caption rows
    (label, value, highlighted) and a badge."""
    if thumbnail:
        thumb = f'<img src="{_href(thumbnail)}" alt="{_e(alt)}" loading="lazy">'
    else:
        thumb = f'<div class="missing">no preview<br>{_e(problem or "")}</div>'
    strong_class = ' class="pred"'
    caption = "".join(f'<div class="row"><span>{_e(label)}</span><span{strong_class if strong else ""}>{_e(value)}</span></div>'
                      for label, value, strong in rows)
    return (f'<figure class="mistake"><div class="thumb" style="height:{height}px">{thumb}</div>'
            f'<figcaption><div class="path" title="{_e(path)}">{_e(path)}</div>{caption}'
            f'<span class="conf">{_e(badge)}</span></figcaption></figure>')
