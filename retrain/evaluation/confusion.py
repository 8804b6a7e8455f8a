"""The confusion matrix as a picture, drawn with Pillow: colour = share of the true class,
number = count; class names that the font cannot draw are spelled out or replaced."""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


@dataclass
class _Layout:
    """Sizes and positions of one confusion-matrix picture."""

    n: int
    cell: int
    labels: list[str]
    label_font: object
    count_font: object
    title_font: object
    axis_font: object
    small_font: object
    horizontal: bool  # column names fit under their cells without turning them
    col_label_h: int
    grid_left: int
    grid_top: int
    title_h: int
    axis_h: int
    width: int
    height: int
    margin: int = 16
    gap: int = 8
    title: str = "Confusion matrix"
    subtitle: str = "rows: true class; colour: share of the row; number: count"
    total_head: str = "total"

    @property
    def grid(self) -> int:
        return self.n * self.cell


def _layout(classes: list[str], matrix: np.ndarray, totals: np.ndarray) -> _Layout:
    n = len(classes)
    cell = int(min(110, max(22, 760 // max(n, 1))))
    label_font = _font(14 if n <= 12 else 12 if n <= 24 else 11)
    title_font, axis_font, small_font = _font(18), _font(15), _font(12)
    count_size = min(22, max(8, int(cell * 0.34)))
    widest = max([str(v) for v in matrix.ravel().tolist()] + ["0"], key=len)
    while count_size > 8 and _text_size(_font(count_size), widest)[0] > cell - 6:
        count_size -= 1
    max_label = 220 if n <= 30 else 160
    labels = [_fit(c, label_font, max_label) or "(blank)" for c in classes]
    if len(set(labels)) < len(labels):  # shortened or respelled names collide: number them as in the table
        labels = [_fit(f"{i}. {c}", label_font, max_label) for i, c in enumerate(classes, start=1)]
    label_w = max([_text_size(label_font, t)[0] for t in labels] + [0])
    label_h = _text_size(label_font, "Ag")[1]
    horizontal = label_w <= cell - 8
    margin, gap = 16, 8
    title_h = _text_size(title_font, "Ag")[1]
    sub_h = _text_size(small_font, "Ag")[1]
    axis_h = _text_size(axis_font, "predicted")[1]
    total_w = max([_text_size(small_font, str(t))[0] for t in totals.tolist()] + [_text_size(small_font, "total")[0]])
    grid_left = margin + axis_h + gap + label_w + gap
    grid_top = margin + title_h + 6 + sub_h + 14 + _text_size(small_font, "total")[1] + 6
    col_label_h = label_h if horizontal else label_w
    width = max(grid_left + n * cell + gap + total_w + margin,
                margin + _text_size(title_font, "Confusion matrix")[0] + margin,
                margin + _text_size(small_font, "rows: true class; colour: share of the row; number: count")[0] + margin)
    height = grid_top + n * cell + gap + col_label_h + gap + axis_h + margin
    return _Layout(n, cell, labels, label_font, _font(count_size), title_font, axis_font, small_font, horizontal,
                   col_label_h, grid_left, grid_top, title_h, axis_h, int(width), int(height), margin, gap)


def render_confusion_matrix(classes: list[str], matrix) -> Image.Image:
    """The confusion matrix as a heatmap: rows = true class, colour = row share, number = count."""
    matrix = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    totals = matrix.sum(axis=1) if n else np.zeros(0, np.int64)
    shares = np.divide(matrix, np.maximum(totals, 1)[:, None], dtype=np.float64) if n else matrix
    at = _layout(classes, matrix, totals)
    image = Image.new("RGB", (at.width, at.height), "white")
    draw = ImageDraw.Draw(image)
    _draw_text(draw, (at.margin, at.margin), at.title, at.title_font, _INK)
    _draw_text(draw, (at.margin, at.margin + at.title_h + 6), at.subtitle, at.small_font, _GREY)
    _draw_cells(draw, at, matrix, shares, totals)
    _draw_axes(image, draw, at)
    return image


def _draw_cells(draw, at: _Layout, matrix, shares, totals) -> None:
    cell, left, top = at.cell, at.grid_left, at.grid_top
    for i in range(at.n):
        y0 = top + i * cell
        for j in range(at.n):
            x0 = left + j * cell
            share = float(shares[i, j])
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_colour(share), outline=_LINE)
            count = int(matrix[i, j])
            ink = "white" if share > 0.5 else (_INK if count else (173, 181, 189))
            _draw_text(draw, (x0 + cell / 2, y0 + cell / 2), str(count), at.count_font, ink, "center", "middle")
        # true-class name to the left of its row, row total to the right
        _draw_text(draw, (left - at.gap, y0 + cell / 2), at.labels[i], at.label_font, _INK, "right", "middle")
        _draw_text(draw, (left + at.grid + at.gap, y0 + cell / 2), str(int(totals[i])), at.small_font, _GREY,
                   "left", "middle")
    if at.n:
        # diagonal (correct answers) outlined so it reads at a glance
        for i in range(at.n):
            x0, y0 = left + i * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(52, 58, 64), width=2 if cell >= 30 else 1)
        head_h = _text_size(at.small_font, at.total_head)[1]
        _draw_text(draw, (left + at.grid + at.gap, top - 6 - head_h), at.total_head, at.small_font, _GREY)


def _draw_axes(image, draw, at: _Layout) -> None:
    """Predicted-class names under their columns, and the two axis titles."""
    labels_top = at.grid_top + at.grid + at.gap
    for j in range(at.n):
        centre = at.grid_left + j * at.cell + at.cell / 2
        if at.horizontal:
            _draw_text(draw, (centre, labels_top), at.labels[j], at.label_font, _INK, "center", "top")
        else:  # turned a quarter: reads bottom to top, its end against the grid
            text = _text_image(at.labels[j], at.label_font, _INK, angle=90)
            image.paste(text, (round(centre - text.width / 2), labels_top), text)
    if at.n:
        _draw_text(draw, (at.grid_left + at.grid / 2, labels_top + at.col_label_h + at.gap), "predicted", at.axis_font,
                   _INK, "center")
        true_title = _text_image("true", at.axis_font, _INK, angle=90)
        image.paste(true_title, (at.margin, round(at.grid_top + at.grid / 2 - true_title.height / 2)), true_title)
    else:
        _draw_text(draw, (at.margin, at.grid_top), "no classes", at.small_font, _GREY)
