"""Likely label errors: training images whose out-of-fold prediction confidently names another class.

Cross-validation gives every training image a prediction from a head that never saw it. The
confident-learning rule (Northcutt et al., "Confident Learning", 2021) flags an image labelled
``i`` when some other class ``j`` gets a probability at or above ``j``'s threshold, the mean
probability that images labelled ``j`` get for ``j`` (its average self-confidence), and ``j`` is
the most probable such class. The tool only lists them: nothing is moved or dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PAGE = "label_errors.html"
THUMBNAILS = "label_errors"
THUMBNAIL_SIZE = 160
MAX_SHOWN = 200  # thumbnails on the page (all are listed in run.json)


def class_thresholds(labels: np.ndarray, probabilities: np.ndarray, n_classes: int) -> np.ndarray:
    """Average self-confidence per class: mean p(j) over the images labelled j."""
    thresholds = np.ones(n_classes)
    for j in range(n_classes):
        mine = labels == j
        if mine.any():
            thresholds[j] = float(probabilities[mine, j].mean())
    return thresholds


def find_label_errors(images, out_of_fold: np.ndarray, classes: list[str]) -> list[dict]:
    """Training images (dataset.ImageFile, in the order of ``out_of_fold``'s rows) whose label
    is likely wrong, most confident first: path, class (its folder), looks_like, confidence."""
    labels = np.asarray([image.label for image in images], np.int64)
    probabilities = np.asarray(out_of_fold, np.float64)
    thresholds = class_thresholds(labels, probabilities, len(classes))
    above = probabilities >= thresholds[None, :]
    found = []
    for row, image in enumerate(images):
        candidates = np.flatnonzero(above[row])
        if not len(candidates):
            continue
        looks_like = int(candidates[np.argmax(probabilities[row, candidates])])
        if looks_like == image.label:
            continue
        found.append({
            "path": image.path,
            "class": classes[image.label],
            "looks_like": classes[looks_like],
            "confidence": round(float(probabilities[row, looks_like]), 4),
            "threshold": round(float(thresholds[looks_like]), 4),
            "probability_of_class": round(float(probabilities[row, image.label]), 4),
        })
    return sorted(found, key=lambda item: (-item["confidence"], item["path"]))


def write_label_error_page(errors: list[dict], folder: Path, classes: list[str]) -> Path:
    """``folder/label_errors.html`` with a thumbnail per listed image (``folder/label_errors/``)."""
    from .html import _CSS, _percent, image_figure
    from .report import _load_thumbnail

    (folder / THUMBNAILS).mkdir()
    figures = []
    for rank, item in enumerate(errors[:MAX_SHOWN], start=1):
        image, problem = _load_thumbnail(item["path"], THUMBNAIL_SIZE)
        relative = None
        if image is not None:
            relative = f"{THUMBNAILS}/{rank:04d}.jpg"
            image.save(folder / relative, "JPEG", quality=85, optimize=True)
        figures.append(image_figure(
            relative, f"in {item['class']}, looks like {item['looks_like']}", problem, item["path"],
            [("folder", item["class"], False), ("looks like", item["looks_like"], True)],
            f"{_percent(item['confidence'])} (threshold {_percent(item['threshold'])})", THUMBNAIL_SIZE))
    more = f" The first {MAX_SHOWN} are shown; run.json lists all." if len(errors) > MAX_SHOWN else ""
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Likely label errors</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header><h1>Likely label errors</h1>
<p class="model">{len(errors)} training image(s) among {len(classes)} classes whose cross-validated prediction
confidently names another class.</p></header>
<section><p class="note">Each image was predicted by a head that did not see it (cross-validation). It is listed
when another class gets at least that class's average confidence on its own images (the threshold), most
confident first. Nothing was moved or dropped: check each image and move it to the right folder if it is
mislabelled.{more}</p>
<div class="grid">{"".join(figures)}</div></section>
</main>
</body>
</html>
"""
    path = folder / PAGE
    path.write_text(page, encoding="utf-8")
    return path
