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
import json
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ConfigError
from ..files import staged_output
from ..safety import REPORT, check_apart, check_output_folder, manifest
from ..data.images import MAX_PIXELS, register_phone_formats, to_rgb  # larger files than MAX_PIXELS get no thumbnail
from .confusion import render_confusion_matrix
from .html import _CSS, _e, _href, _number, _percent, _quality, image_figure

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


def render_html(evaluation, classes, matrix, mistakes, n_mistakes, thumbnail_size: int) -> str:
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
<title>{_e(f"Evaluation of {evaluation.model}")}</title>
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
<section id="summary"><h2>Summary</h2><div class="cards">{"".join(_summary_cards(evaluation, n_mistakes))}</div></section>
<section id="confusion"><h2>Confusion matrix</h2>
<p class="note">Rows are the true class, columns the predicted class. Colour shows the share of each true class;
the outlined diagonal holds the correct answers.</p>
<div class="figure"><img src="{_href(CONFUSION_PNG)}" alt="Confusion matrix: rows true class, columns predicted class"></div>
</section>
<section id="classes"><h2>Per class</h2>
<table><tr><th class="num">#</th><th>class</th><th class="num">precision</th><th class="num">recall</th><th class="num">F1</th>
<th class="num">support</th></tr>
{"".join(_class_rows(evaluation, classes))}
</table></section>
<section id="mistakes"><h2>Most confident mistakes</h2>{_mistakes_html(evaluation, mistakes, n_mistakes, thumbnail_size)}</section>
{_skipped_html(evaluation)}
<section id="files"><h2>Files</h2><ul class="files">{_files_html()}</ul></section>
</main>
</body>
</html>
"""


def _card(value: str, label: str, quality: str = "") -> str:
    return f'<div class="card {quality}"><div class="value">{value}</div><div class="label">{label}</div></div>'


def _summary_cards(evaluation, n_mistakes: int) -> list[str]:
    accuracy = float(evaluation.accuracy)
    cards = [_card(_percent(accuracy), "accuracy", _quality(accuracy)),
             _card(str(int(evaluation.n_images)), "images evaluated"),
             _card(_number(evaluation.macro_f1), "macro F1", _quality(float(evaluation.macro_f1)))]
    interval = getattr(evaluation, "accuracy_interval", None)
    if interval:
        cards.insert(1, _card(f"{_percent(interval[0])}–{_percent(interval[1])}", "95% interval of the accuracy"))
    top_k = dict(evaluation.top_k_accuracy or {})

    def k_of(key):
        try:
            return int(str(key).rsplit("_", 1)[-1])
        except ValueError:
            return 1_000_000

    for key in sorted(top_k, key=k_of):
        cards.append(_card(_percent(top_k[key]), f"top-{_e(k_of(key)) if k_of(key) < 1_000_000 else _e(key)} accuracy"))
    cards.append(_card(str(n_mistakes), "mistakes"))
    if evaluation.skipped:
        cards.append(_card(str(len(evaluation.skipped)), "files skipped", "poor"))
    return cards


def _class_rows(evaluation, classes) -> list[str]:
    """The per-class table; the lowest recall (among classes with images) highlighted."""
    per_class = evaluation.per_class or {}
    recalls = {
        c: float(per_class[c]["recall"]) for c in classes if c in per_class and int(per_class[c].get("support", 0)) > 0
    }
    lowest = min(recalls.values()) if recalls else None
    worst = {c for c, r in recalls.items() if lowest is not None and r == lowest and lowest < 1.0}
    rows = []
    for number, name in enumerate(classes, start=1):
        row = per_class.get(name, {})
        recall = float(row.get("recall", 0.0))
        marked = ' class="worst"' if name in worst else ""
        rows.append(
            f'<tr{marked}><td class="num index">{number}</td><td class="name">{_e(name)}</td>'
            f'<td class="num">{_number(row.get("precision", 0.0))}</td>'
            f'<td class="num">{_number(recall)}<span class="bar"><span style="width:{recall * 100:.1f}%"></span></span></td>'
            f'<td class="num">{_number(row.get("f1", 0.0))}</td>'
            f'<td class="num">{int(row.get("support", 0))}</td></tr>'
        )
    return rows


def _mistakes_html(evaluation, mistakes, n_mistakes: int, thumbnail_size: int) -> str:
    if mistakes:
        figures = [
            image_figure(m["thumbnail"], f"true {m['true_class']}, predicted {m['predicted_class']}",
                         m.get("thumbnail_error"), m["path"],
                         [("true", m["true_class"], False), ("predicted", m["predicted_class"], True)],
                         f"{_percent(m['confidence'])} confident", thumbnail_size)
            for m in mistakes
        ]
        shown = (f"All {n_mistakes} mistakes" if len(mistakes) == n_mistakes
                 else f"The {len(mistakes)} most confident of {n_mistakes} mistakes")
        return f'<p class="note">{shown}, most confident first.</p><div class="grid">{"".join(figures)}</div>'
    if n_mistakes and not evaluation.records:
        return f'<p class="empty">{n_mistakes} mistakes; this evaluation has no per-image results to show.</p>'
    if n_mistakes:
        return f'<p class="empty">{n_mistakes} mistakes; none shown (max_mistakes is 0).</p>'
    return '<p class="empty">No mistakes: every image was classified correctly.</p>'


def _skipped_html(evaluation) -> str:
    if not evaluation.skipped:
        return ""
    items = "".join(
        f'<tr><td class="path">{_e(s.get("path", ""))}</td><td>{_e(s.get("reason", ""))}</td></tr>'
        for s in evaluation.skipped
    )
    table = f'<table class="skipped"><tr><th>file</th><th>reason</th></tr>{items}</table>'
    if len(evaluation.skipped) > 20:
        table = f"<details><summary>{len(evaluation.skipped)} files</summary>{table}</details>"
    return ('<section id="skipped"><h2>Skipped files</h2>'
            f'<p class="note">These files could not be decoded and are not in the figures above.</p>{table}</section>')


def _files_html() -> str:
    files = [
        (CONFUSION_CSV, "confusion matrix (CSV, rows = true class)"),
        (PER_CLASS_CSV, "per-class precision, recall, F1, support (CSV)"),
        (REPORT_JSON, "everything above, machine-readable (JSON)"),
        (CONFUSION_PNG, "confusion matrix picture (PNG)"),
    ]
    return "".join(f'<li><a href="{_href(f)}">{_e(f)}</a> – {_e(d)}</li>' for f, d in files)
