"""A report of an evaluation that a person would rather look at than read.

``write_report(evaluation, directory)`` writes one self-contained folder::

    index.html             the page: summary, confusion matrix, per-class table, mistakes, skipped files
    confusion_matrix.png   heatmap drawn with Pillow (colour = share of the true class, number = count)
    confusion_matrix.csv   counts, rows = true class
    per_class.csv          precision, recall, F1, support
    report.json            the evaluation's ``to_dict()`` plus the mistakes shown
    mistakes/              JPEG thumbnails of the most confident mistakes (generated names only)

The page has no JavaScript and no external URL: it opens from disk, and every link and image
source in it is relative to the folder. The folder is written beside its destination and moved
into place only when complete, so a failure leaves any earlier report as it was.
"""

from __future__ import annotations

import csv
import functools
import html
import json
import math
import os
import unicodedata
import warnings
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..errors import ConfigError
from ..files import staged_output
from ..safety import REPORT, check_apart, check_output_folder, manifest
from ..data.images import MAX_PIXELS, register_phone_formats, to_rgb  # larger files than MAX_PIXELS get no thumbnail

INDEX = "index.html"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_CSV = "confusion_matrix.csv"
PER_CLASS_CSV = "per_class.csv"
REPORT_JSON = "report.json"
MISTAKES_DIR = "mistakes"


def write_report(
    evaluation,
    directory,
    *,
    max_mistakes: int = 24,
    thumbnail_size: int = 160,
    overwrite: bool = False,
    reads: dict | None = None,
) -> dict:
    """Write the report folder ``directory`` for ``evaluation``; return the paths written.

    ``reads`` (role -> path: the model, the image folder) must not overlap the report folder.
    An empty ``directory`` is filled; an earlier report is refused with ``OutputError`` unless
    ``overwrite``, and then replaced only once the new report is complete; any other non-empty
    folder is refused (see safety.py).
    Returns {"index", "confusion_matrix_png", "confusion_matrix_csv", "per_class_csv",
    "report_json": path, "mistakes": [thumbnail paths]} (paths inside the final folder).
    """
    if max_mistakes < 0:
        raise ConfigError(f"max_mistakes must be 0 or more, got {max_mistakes}")
    if thumbnail_size < 16:
        raise ConfigError(f"thumbnail_size must be at least 16 pixels, got {thumbnail_size}")
    target = _target(directory)
    check_report_folder(target, overwrite, reads)
    with staged_output(target, REPORT) as stage:
        written = _write_all(evaluation, stage, max_mistakes, thumbnail_size)
    return {
        key: ([str(target / p) for p in value] if isinstance(value, list) else str(target / value))
        for key, value in written.items()
    }


# --- the folder --------------------------------------------------------------------------------


def _target(directory) -> Path:
    """The report folder, symbolic links resolved (the folder they point to is the one written)."""
    return Path(os.path.expanduser(os.fspath(directory))).resolve()


def check_report_folder(directory, overwrite: bool = False, reads: dict | None = None) -> None:
    """Raise OutputError when ``directory`` is not a place a report may be written to: a folder
    that is neither new, empty nor an earlier report, or one that overlaps ``reads`` (role -> path
    of what the evaluation reads: the model, the image folder)."""
    check_apart({"report folder": directory}, reads or {})
    check_output_folder(_target(directory), REPORT, overwrite)


def _write_all(evaluation, folder: Path, max_mistakes: int, thumbnail_size: int) -> dict:
    classes = [str(c) for c in evaluation.classes]
    matrix = np.asarray(evaluation.confusion_matrix, dtype=np.int64).reshape(len(classes), len(classes))

    render_confusion_matrix(classes, matrix).save(folder / CONFUSION_PNG, optimize=True)
    _write_confusion_csv(folder / CONFUSION_CSV, classes, matrix)
    _write_per_class_csv(folder / PER_CLASS_CSV, classes, evaluation.per_class)

    all_mistakes = find_mistakes(evaluation)
    shown = all_mistakes[:max_mistakes]
    if shown:
        (folder / MISTAKES_DIR).mkdir()
    width = max(3, len(str(len(shown))))
    thumbnails = []
    for rank, mistake in enumerate(shown, start=1):
        relative = f"{MISTAKES_DIR}/mistake_{rank:0{width}d}.jpg"
        image, problem = _load_thumbnail(mistake["path"], thumbnail_size)
        if image is not None:
            image.save(folder / relative, "JPEG", quality=85, optimize=True)
            thumbnails.append(relative)
        mistake["thumbnail"] = relative if image is not None else None
        mistake["thumbnail_error"] = problem

    n_mistakes = len(all_mistakes) if evaluation.records else _off_diagonal(matrix)
    page = render_html(evaluation, classes, matrix, shown, n_mistakes, thumbnail_size)
    (folder / INDEX).write_text(page, encoding="utf-8")

    # Written last: the marker that makes the folder replaceable by a later report, listing every file.
    data = {"tool": "retrain", "output_kind": "report", **evaluation.to_dict(), "n_mistakes": n_mistakes, "mistakes": shown}
    data["files"] = manifest(folder, REPORT)
    (folder / REPORT_JSON).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {
        "index": INDEX,
        "confusion_matrix_png": CONFUSION_PNG,
        "confusion_matrix_csv": CONFUSION_CSV,
        "per_class_csv": PER_CLASS_CSV,
        "report_json": REPORT_JSON,
        "mistakes": thumbnails,
    }


def _off_diagonal(matrix: np.ndarray) -> int:
    return int(matrix.sum() - np.trace(matrix)) if matrix.size else 0


def find_mistakes(evaluation) -> list[dict]:
    """Every wrongly classified image, most confident first (ties by path)."""
    classes = list(evaluation.classes)
    found = []
    for record in evaluation.records:
        predicted = record.predicted
        if predicted != record.label:
            found.append(
                {
                    "path": str(record.path),
                    "true_class": classes[record.label],
                    "predicted_class": classes[predicted],
                    "confidence": record.confidence,
                }
            )
    found.sort(key=lambda m: (-m["confidence"], m["path"]))
    return found


# --- tables ------------------------------------------------------------------------------------


def _write_confusion_csv(path: Path, classes: list[str], matrix: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, matrix.tolist()):
            writer.writerow([name, *row])


def _write_per_class_csv(path: Path, classes: list[str], per_class: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for name in classes:
            row = per_class.get(name, {})
            writer.writerow(
                [name, *(float(row.get(k, 0.0)) for k in ("precision", "recall", "f1")), int(row.get("support", 0))]
            )


# --- thumbnails --------------------------------------------------------------------------------


def _load_thumbnail(path: str, size: int):
    """(RGB thumbnail fitting size x size, None) or (None, why not)."""
    register_phone_formats()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    return None, f"image too large ({image.width}x{image.height} pixels)"
                if image.format == "JPEG":
                    image.draft("RGB", (size, size))  # decode at a reduced scale: much faster
                image.load()
                image = to_rgb(ImageOps.exif_transpose(image))
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        return image, None
    except FileNotFoundError:
        return None, "file not found"
    except Exception as error:  # noqa: BLE001 - any undecodable file just gets no thumbnail
        return None, f"cannot open: {error}"


# --- confusion-matrix picture ------------------------------------------------------------------

# Light to dark blue (the "Blues" colour map): colour = share of the row (true class).
_STOPS = [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)]
_INK = (33, 37, 41)
_GREY = (110, 117, 125)
_LINE = (222, 226, 230)


@functools.lru_cache(maxsize=None)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable font: Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError, AttributeError):
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _draw_text(draw, xy, text, font, fill, align="left", valign="top"):
    """Text placed by its visible box: align left/center/right on x, top/middle on y."""
    left, top, right, bottom = font.getbbox(text)
    x, y = xy
    if align == "center":
        x -= (right - left) / 2
    elif align == "right":
        x -= right - left
    if valign == "middle":
        y -= (bottom - top) / 2
    draw.text((round(x - left), round(y - top)), text, font=font, fill=fill)


# Pillow's built-in font covers ASCII only: other letters are spelled with ASCII where there is a
# usual spelling, else drawn as "?" (the page and the CSV files carry the exact names).
_SPELLED = {
    "ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L",
    "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th", "ı": "i", "«": '"', "»": '"',
    "“": '"', "”": '"', "„": '"', "‘": "'", "’": "'", "–": "-", "—": "-", "…": "...", "×": "x", "µ": "u",
}


@functools.lru_cache(maxsize=4096)
def _has_glyph(char: str) -> bool:
    font = _font(14)
    try:
        mask, missing = font.getmask(char), font.getmask("\U000F0000")  # a code point no font draws
        return not (mask.size == missing.size and bytes(mask) == bytes(missing))
    except Exception:  # noqa: BLE001 - e.g. the bitmap fallback font cannot encode the character
        return False


def _drawable(text: str) -> str:
    """``text`` with what the font cannot draw spelled in ASCII or shown as '?'."""
    out = []
    for char in " ".join(text.split()):
        if char.isascii() or _has_glyph(char):
            out.append(char if char.isprintable() else "?")
        elif char in _SPELLED:
            out.append(_SPELLED[char])
        else:
            base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
            out.append(base if base and all(c.isascii() and c.isprintable() or _has_glyph(c) for c in base) else "?")
    return "".join(out)


def _fit(text: str, font, max_width: int) -> str:
    """``text`` on one line, shortened with '...' to at most ``max_width`` pixels."""
    text = _drawable(text)
    if _text_size(font, text)[0] <= max_width:
        return text
    low, high = 0, len(text)
    while low < high:  # longest prefix that fits with the ellipsis
        middle = (low + high + 1) // 2
        if _text_size(font, text[:middle].rstrip() + "...")[0] <= max_width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "..."


def _colour(value: float) -> tuple[int, int, int]:
    value = min(max(value, 0.0), 1.0) * (len(_STOPS) - 1)
    index = min(int(value), len(_STOPS) - 2)
    t = value - index
    a, b = _STOPS[index], _STOPS[index + 1]
    return tuple(round(a[i] + (b[i] - a[i]) * t) for i in range(3))


def _text_image(text: str, font, fill, angle: int = 0) -> Image.Image:
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (255, 255, 255, 0))
    ImageDraw.Draw(image).text((-left, -top), text, font=font, fill=fill)
    return image.rotate(angle, expand=True) if angle else image


def render_confusion_matrix(classes: list[str], matrix) -> Image.Image:
    """The confusion matrix as a heatmap: rows = true class, colour = row share, number = count."""
    matrix = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    totals = matrix.sum(axis=1) if n else np.zeros(0, np.int64)
    shares = np.divide(matrix, np.maximum(totals, 1)[:, None], dtype=np.float64) if n else matrix

    cell = int(min(110, max(22, 760 // max(n, 1))))
    label_font = _font(14 if n <= 12 else 12 if n <= 24 else 11)
    title_font, axis_font, small_font = _font(18), _font(15), _font(12)
    count_size = min(22, max(8, int(cell * 0.34)))
    widest = max([str(v) for v in matrix.ravel().tolist()] + ["0"], key=len)
    while count_size > 8 and _text_size(_font(count_size), widest)[0] > cell - 6:
        count_size -= 1
    count_font = _font(count_size)

    max_label = 220 if n <= 30 else 160
    labels = [_fit(c, label_font, max_label) or "(blank)" for c in classes]
    if len(set(labels)) < len(labels):  # shortened or respelled names collide: number them as in the table
        labels = [_fit(f"{i}. {c}", label_font, max_label) for i, c in enumerate(classes, start=1)]
    label_w = max([_text_size(label_font, t)[0] for t in labels] + [0])
    label_h = _text_size(label_font, "Ag")[1]
    horizontal = label_w <= cell - 8  # column names fit under their cell without turning them

    margin, gap = 16, 8
    title = "Confusion matrix"
    subtitle = "rows: true class; colour: share of the row; number: count"
    title_h = _text_size(title_font, "Ag")[1]
    sub_h = _text_size(small_font, "Ag")[1]
    axis_h = _text_size(axis_font, "predicted")[1]
    total_head = "total"
    total_w = max([_text_size(small_font, str(t))[0] for t in totals.tolist()] + [_text_size(small_font, total_head)[0]])

    grid_left = margin + axis_h + gap + label_w + gap
    grid_top = margin + title_h + 6 + sub_h + 14 + _text_size(small_font, total_head)[1] + 6
    grid_w = grid_h = n * cell
    col_label_h = label_h if horizontal else label_w
    width = max(
        grid_left + grid_w + gap + total_w + margin,
        margin + _text_size(title_font, title)[0] + margin,
        margin + _text_size(small_font, subtitle)[0] + margin,
    )
    height = grid_top + grid_h + gap + col_label_h + gap + axis_h + margin

    image = Image.new("RGB", (int(width), int(height)), "white")
    draw = ImageDraw.Draw(image)
    _draw_text(draw, (margin, margin), title, title_font, _INK)
    _draw_text(draw, (margin, margin + title_h + 6), subtitle, small_font, _GREY)

    for i in range(n):
        y0 = grid_top + i * cell
        for j in range(n):
            x0 = grid_left + j * cell
            share = float(shares[i, j])
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_colour(share), outline=_LINE)
            count = int(matrix[i, j])
            ink = "white" if share > 0.5 else (_INK if count else (173, 181, 189))
            _draw_text(draw, (x0 + cell / 2, y0 + cell / 2), str(count), count_font, ink, "center", "middle")
        # true-class name to the left of its row, row total to the right
        _draw_text(draw, (grid_left - gap, y0 + cell / 2), labels[i], label_font, _INK, "right", "middle")
        _draw_text(draw, (grid_left + grid_w + gap, y0 + cell / 2), str(int(totals[i])), small_font, _GREY, "left", "middle")
    if n:
        # diagonal (correct answers) outlined so it reads at a glance
        for i in range(n):
            x0, y0 = grid_left + i * cell, grid_top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(52, 58, 64), width=2 if cell >= 30 else 1)
        head_h = _text_size(small_font, total_head)[1]
        _draw_text(draw, (grid_left + grid_w + gap, grid_top - 6 - head_h), total_head, small_font, _GREY)

    # predicted-class names under their columns
    labels_top = grid_top + grid_h + gap
    for j in range(n):
        centre = grid_left + j * cell + cell / 2
        if horizontal:
            _draw_text(draw, (centre, labels_top), labels[j], label_font, _INK, "center", "top")
        else:  # turned a quarter: reads bottom to top, its end against the grid
            text = _text_image(labels[j], label_font, _INK, angle=90)
            image.paste(text, (round(centre - text.width / 2), labels_top), text)

    # axis titles
    if n:
        _draw_text(draw, (grid_left + grid_w / 2, labels_top + col_label_h + gap), "predicted", axis_font, _INK, "center")
        true_title = _text_image("true", axis_font, _INK, angle=90)
        image.paste(true_title, (margin, round(grid_top + grid_h / 2 - true_title.height / 2)), true_title)
    else:
        _draw_text(draw, (margin, grid_top), "no classes", small_font, _GREY)
    return image


# --- page --------------------------------------------------------------------------------------


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


def render_html(evaluation, classes, matrix, mistakes, n_mistakes, thumbnail_size: int) -> str:
    title = f"Evaluation of {evaluation.model}"
    accuracy = float(evaluation.accuracy)
    cards = [
        f'<div class="card {_quality(accuracy)}"><div class="value">{_percent(accuracy)}</div>'
        '<div class="label">accuracy</div></div>',
        f'<div class="card"><div class="value">{int(evaluation.n_images)}</div><div class="label">images evaluated</div></div>',
        f'<div class="card {_quality(float(evaluation.macro_f1))}"><div class="value">{_number(evaluation.macro_f1)}</div>'
        '<div class="label">macro F1</div></div>',
    ]
    top_k = dict(evaluation.top_k_accuracy or {})

    def k_of(key):
        try:
            return int(str(key).rsplit("_", 1)[-1])
        except ValueError:
            return 1_000_000

    for key in sorted(top_k, key=k_of):
        cards.append(
            f'<div class="card"><div class="value">{_percent(top_k[key])}</div>'
            f'<div class="label">top-{_e(k_of(key)) if k_of(key) < 1_000_000 else _e(key)} accuracy</div></div>'
        )
    cards.append(f'<div class="card"><div class="value">{n_mistakes}</div><div class="label">mistakes</div></div>')
    if evaluation.skipped:
        cards.append(
            f'<div class="card poor"><div class="value">{len(evaluation.skipped)}</div>'
            '<div class="label">files skipped</div></div>'
        )

    # per-class table: lowest recall (among classes with images) highlighted
    per_class = evaluation.per_class or {}
    recalls = {
        c: float(per_class[c]["recall"]) for c in classes if c in per_class and int(per_class[c].get("support", 0)) > 0
    }
    lowest = min(recalls.values()) if recalls else None
    worst = {c for c, r in recalls.items() if lowest is not None and r == lowest and lowest < 1.0}
    rows = []
    worst_attr = ' class="worst"'
    for number, name in enumerate(classes, start=1):
        row = per_class.get(name, {})
        recall = float(row.get("recall", 0.0))
        rows.append(
            f'<tr{worst_attr if name in worst else ""}><td class="num index">{number}</td><td class="name">{_e(name)}</td>'
            f'<td class="num">{_number(row.get("precision", 0.0))}</td>'
            f'<td class="num">{_number(recall)}<span class="bar"><span style="width:{recall * 100:.1f}%"></span></span></td>'
            f'<td class="num">{_number(row.get("f1", 0.0))}</td>'
            f'<td class="num">{int(row.get("support", 0))}</td></tr>'
        )

    # mistakes grid
    if mistakes:
        figures = []
        for mistake in mistakes:
            if mistake["thumbnail"]:
                alt = f"true {mistake['true_class']}, predicted {mistake['predicted_class']}"
                thumb = f'<img src="{_href(mistake["thumbnail"])}" alt="{_e(alt)}" loading="lazy">'
            else:
                thumb = f'<div class="missing">no preview<br>{_e(mistake.get("thumbnail_error") or "")}</div>'
            figures.append(
                f'<figure class="mistake"><div class="thumb" style="height:{thumbnail_size}px">{thumb}</div>'
                f'<figcaption><div class="path" title="{_e(mistake["path"])}">{_e(mistake["path"])}</div>'
                f'<div class="row"><span>true</span><span>{_e(mistake["true_class"])}</span></div>'
                f'<div class="row"><span>predicted</span><span class="pred">{_e(mistake["predicted_class"])}</span></div>'
                f'<span class="conf">{_percent(mistake["confidence"])} confident</span></figcaption></figure>'
            )
        shown = (
            f"All {n_mistakes} mistakes" if len(mistakes) == n_mistakes else f"The {len(mistakes)} most confident of {n_mistakes} mistakes"
        )
        mistakes_html = f'<p class="note">{shown}, most confident first.</p><div class="grid">{"".join(figures)}</div>'
    elif n_mistakes and not evaluation.records:
        mistakes_html = f'<p class="empty">{n_mistakes} mistakes; this evaluation has no per-image results to show.</p>'
    elif n_mistakes:
        mistakes_html = f'<p class="empty">{n_mistakes} mistakes; none shown (max_mistakes is 0).</p>'
    else:
        mistakes_html = '<p class="empty">No mistakes: every image was classified correctly.</p>'

    skipped_html = ""
    if evaluation.skipped:
        items = "".join(
            f'<tr><td class="path">{_e(s.get("path", ""))}</td><td>{_e(s.get("reason", ""))}</td></tr>'
            for s in evaluation.skipped
        )
        table = f'<table class="skipped"><tr><th>file</th><th>reason</th></tr>{items}</table>'
        if len(evaluation.skipped) > 20:
            table = f"<details><summary>{len(evaluation.skipped)} files</summary>{table}</details>"
        skipped_html = (
            '<section id="skipped"><h2>Skipped files</h2>'
            f'<p class="note">These files could not be decoded and are not in the figures above.</p>{table}</section>'
        )

    files = [
        (CONFUSION_CSV, "confusion matrix (CSV, rows = true class)"),
        (PER_CLASS_CSV, "per-class precision, recall, F1, support (CSV)"),
        (REPORT_JSON, "everything above, machine-readable (JSON)"),
        (CONFUSION_PNG, "confusion matrix picture (PNG)"),
    ]
    files_html = "".join(f'<li><a href="{_href(f)}">{_e(f)}</a> – {_e(d)}</li>' for f, d in files)
    nav = [("summary", "Summary"), ("confusion", "Confusion matrix"), ("classes", "Per class"), ("mistakes", "Mistakes")]
    if evaluation.skipped:
        nav.append(("skipped", "Skipped files"))
    nav.append(("files", "Files"))
    nav_html = "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in nav)
    when = datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M %Z")

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header>
<h1>Evaluation report</h1>
<p class="model">Model <code>{_e(evaluation.model)}</code><span class="kind">{_e(evaluation.kind)}</span></p>
<p class="when">{len(classes)} classes · written {_e(when)}</p>
<nav>{nav_html}</nav>
</header>
<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div></section>
<section id="confusion"><h2>Confusion matrix</h2>
<p class="note">Rows are the true class, columns the predicted class. Colour shows the share of each true class;
the outlined diagonal holds the correct answers.</p>
<div class="figure"><img src="{_href(CONFUSION_PNG)}" alt="Confusion matrix: rows true class, columns predicted class"></div>
</section>
<section id="classes"><h2>Per class</h2>
<table><tr><th class="num">#</th><th>class</th><th class="num">precision</th><th class="num">recall</th><th class="num">F1</th>
<th class="num">support</th></tr>
{"".join(rows)}
</table></section>
<section id="mistakes"><h2>Most confident mistakes</h2>{mistakes_html}</section>
{skipped_html}
<section id="files"><h2>Files</h2><ul class="files">{files_html}</ul></section>
</main>
</body>
</html>
"""
