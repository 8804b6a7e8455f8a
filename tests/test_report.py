"""The evaluation report folder: files, numbers, thumbnails, links, escaping, atomic replacement.

Offline and without TensorFlow: the Evaluation is built by hand over images drawn with Pillow.
"""

from __future__ import annotations

import csv
import json
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from retrain.evaluation import report
from retrain.errors import OutputError
from retrain.evaluation.evaluate import Evaluation, ImageRecord, classification_metrics, top_k_accuracy

CLASSES = ["cat", 'Große "dog" & co', "<b>bird</b>"]
# (true label, predicted label, confidence of the prediction) per image
PLAN = [
    (0, 0, 0.95), (0, 0, 0.85), (0, 0, 0.75), (0, 1, 0.90),
    (1, 1, 0.80), (1, 1, 0.99), (1, 2, 0.70),  # the 0.70 mistake's file is deleted afterwards
    (2, 2, 0.65), (2, 0, 0.80), (2, 1, 0.60),
]
MISTAKE_CONFIDENCES = [0.90, 0.80, 0.70, 0.60]
MISSING_CONFIDENCE = 0.70
ROTATED_CONFIDENCE = 0.90  # stored landscape with EXIF "rotate 90": its thumbnail must be portrait


def _probabilities(true, predicted, confidence):
    p = np.zeros(len(CLASSES), np.float32)
    p[predicted] = confidence
    rest = [k for k in range(len(CLASSES)) if k != predicted]
    p[rest[0]] = (1 - confidence) * 0.6
    p[rest[1]] = (1 - confidence) * 0.4
    return p


@pytest.fixture
def evaluation(tmp_path):
    root = tmp_path / "images"
    records = []
    colours = [(220, 60, 60), (60, 160, 60), (60, 60, 220)]
    for index, (true, predicted, confidence) in enumerate(PLAN):
        folder = root / CLASSES[true]  # the class name as a folder name: quotes, '<', unicode, spaces
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"photo {index} «ü».jpg"
        image = Image.new("RGB", (320, 200), colours[true])
        image.paste((255, 255, 255), (0, 0, 60, 200))
        exif = Image.Exif()
        if confidence == ROTATED_CONFIDENCE and true != predicted:
            exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        image.save(path, "JPEG", exif=exif)
        records.append(ImageRecord(str(path), true, _probabilities(true, predicted, confidence)))
    for record in records:
        if record.label != record.predicted and record.confidence == pytest.approx(MISSING_CONFIDENCE):
            os.remove(record.path)  # evaluated, then moved away before the report
    labels = np.array([r.label for r in records])
    probabilities = np.stack([r.probabilities for r in records])
    metrics = classification_metrics(labels, probabilities.argmax(axis=1), CLASSES)
    return Evaluation(
        model=str(tmp_path / "models" / "my model «v2»"),
        kind="savedmodel",
        classes=list(CLASSES),
        top_k_accuracy={f"top_{k}": top_k_accuracy(labels, probabilities, k) for k in (1, 3)},
        skipped=[{"path": str(tmp_path / 'broken <x> "y".jpg'), "reason": "cannot decode: <truncated>"}],
        records=records,
        **metrics,
    )


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.links, self.alts, self.text = [], [], [], []
        self.rows = []  # (class attribute, text) of each <tr>
        self._row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        for name in ("src", "href"):
            if attrs.get(name) is not None:
                self.links.append(attrs[name])
        if "alt" in attrs:
            self.alts.append(attrs["alt"])
        if tag == "tr":
            self._row = [attrs.get("class") or "", ""]
            self.rows.append(self._row)

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None:
            self._row[1] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def test_every_file_is_written(evaluation, tmp_path):
    out = tmp_path / "reports" / "run 1"
    paths = report.write_report(evaluation, out)
    assert set(paths) == {"index", "confusion_matrix_png", "confusion_matrix_csv", "per_class_csv", "report_json", "mistakes"}
    for key in ("index", "confusion_matrix_png", "confusion_matrix_csv", "per_class_csv", "report_json"):
        assert Path(paths[key]).is_file() and Path(paths[key]).parent == out
    assert len(paths["mistakes"]) == 3  # four mistakes, one file gone
    assert all(Path(p).is_file() and Path(p).parent == out / "mistakes" for p in paths["mistakes"])
    with Image.open(paths["confusion_matrix_png"]) as png:
        assert png.format == "PNG"
        assert 250 <= png.width <= 2000 and 250 <= png.height <= 2000
        colours = png.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20  # a drawn picture, not a blank canvas
    assert _siblings(out) == []  # no staging or old folder left beside it


def test_csvs_match_the_evaluation(evaluation, tmp_path):
    paths = report.write_report(evaluation, tmp_path / "out")
    with open(paths["confusion_matrix_csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["true\\predicted", *CLASSES]
    assert [r[0] for r in rows[1:]] == CLASSES
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == evaluation.confusion_matrix
    assert evaluation.confusion_matrix == [[3, 1, 0], [0, 2, 1], [1, 1, 1]]

    with open(paths["per_class_csv"], newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [r["class"] for r in table] == CLASSES
    for row in table:
        expected = evaluation.per_class[row["class"]]
        for key in ("precision", "recall", "f1"):
            assert float(row[key]) == pytest.approx(expected[key])
        assert int(row["support"]) == expected["support"]


def test_mistakes_most_confident_first_and_limited(evaluation, tmp_path):
    paths = report.write_report(evaluation, tmp_path / "all", thumbnail_size=64)
    data = json.loads(Path(paths["report_json"]).read_text(encoding="utf-8"))
    assert {k: v for k, v in data.items() if k not in ("mistakes", "n_mistakes", "tool", "output_kind", "files")} == evaluation.to_dict()
    assert (data["tool"], data["output_kind"]) == ("retrain", "report")
    assert data["files"] == sorted(p.relative_to(tmp_path / "all").as_posix() for p in (tmp_path / "all").rglob("*") if p.is_file())
    mistakes = data["mistakes"]
    assert [m["confidence"] for m in mistakes] == pytest.approx(MISTAKE_CONFIDENCES)
    assert data["n_mistakes"] == 4
    for mistake in mistakes:
        record = next(r for r in evaluation.records if r.path == mistake["path"])
        assert mistake["true_class"] == CLASSES[record.label]
        assert mistake["predicted_class"] == CLASSES[record.predicted]
    missing = mistakes[MISTAKE_CONFIDENCES.index(MISSING_CONFIDENCE)]
    assert missing["thumbnail"] is None and not Path(missing["path"]).exists()  # listed, no picture
    thumbs = [m["thumbnail"] for m in mistakes if m["thumbnail"]]
    assert thumbs == [Path(p).relative_to(tmp_path / "all").as_posix() for p in paths["mistakes"]]
    for name in thumbs:
        assert Path(name).name.startswith("mistake_") and name.endswith(".jpg")  # generated, never the original
        with Image.open(tmp_path / "all" / name) as thumb:
            assert thumb.format == "JPEG" and thumb.mode == "RGB" and max(thumb.size) <= 64
    with Image.open(tmp_path / "all" / mistakes[0]["thumbnail"]) as rotated:
        assert rotated.height > rotated.width  # EXIF orientation applied (stored 320x200)

    paths = report.write_report(evaluation, tmp_path / "two", max_mistakes=2)
    data = json.loads(Path(paths["report_json"]).read_text(encoding="utf-8"))
    assert [m["confidence"] for m in data["mistakes"]] == pytest.approx(MISTAKE_CONFIDENCES[:2])
    assert data["n_mistakes"] == 4 and len(paths["mistakes"]) == 2
    assert "The 2 most confident of 4 mistakes" in Path(paths["index"]).read_text(encoding="utf-8")


def test_every_relative_link_resolves(evaluation, tmp_path):
    out = tmp_path / "out"
    paths = report.write_report(evaluation, out)
    page = _parse(Path(paths["index"]))
    files = [link for link in page.links if not link.startswith("#")]
    assert files, "no links found"
    for link in page.links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc, f"external or absolute URL in the page: {link}"
        if link.startswith("#"):
            continue
        assert not link.startswith("/")
        target = (out / unquote(parts.path)).resolve()
        assert target.is_file(), link
        assert target.is_relative_to(out.resolve())
    linked = {unquote(link) for link in files}
    assert {"confusion_matrix.png", "confusion_matrix.csv", "per_class.csv", "report.json"} <= linked
    assert {Path(p).relative_to(out).as_posix() for p in paths["mistakes"]} <= linked
    html_text = Path(paths["index"]).read_text(encoding="utf-8")
    assert "http://" not in html_text and "https://" not in html_text and "<script" not in html_text


def test_names_and_paths_are_escaped(evaluation, tmp_path):
    paths = report.write_report(evaluation, tmp_path / "out")
    raw = Path(paths["index"]).read_text(encoding="utf-8")
    assert "<b>bird</b>" not in raw and "&lt;b&gt;bird&lt;/b&gt;" in raw
    page = _parse(Path(paths["index"]))
    assert "b" not in page.tags  # the class name never became markup
    text = "".join(page.text)
    for name in CLASSES:
        assert name in text  # shown as written once the entities are decoded
    assert evaluation.model in text
    for record in evaluation.records:
        if record.predicted != record.label:
            assert record.path in text
    assert evaluation.skipped[0]["path"] in text and "cannot decode: <truncated>" in text
    # quotes inside names did not cut attributes short: alt texts come back whole
    assert f"true {CLASSES[2]}, predicted {CLASSES[0]}" in page.alts
    assert f"true {CLASSES[0]}, predicted {CLASSES[1]}" in page.alts
    # the lowest recall (<b>bird</b>: 1 of 3) is the highlighted row
    worst = [row_text for cls, row_text in page.rows if "worst" in cls.split()]
    assert len(worst) == 1 and worst[0].startswith(f"3{CLASSES[2]}")  # number, then name


def test_rerun_needs_overwrite_then_replaces_the_folder(evaluation, tmp_path):
    out = tmp_path / "reports" / "out"
    report.write_report(evaluation, out)
    with pytest.raises(OutputError, match="holds an earlier report: pass --overwrite"):
        report.write_report(evaluation, out, max_mistakes=1)
    paths = report.write_report(evaluation, out, max_mistakes=1, overwrite=True)
    assert sorted(p.name for p in (out / "mistakes").iterdir()) == ["mistake_001.jpg"]
    assert len(paths["mistakes"]) == 1
    assert _siblings(out) == []


def test_failure_midway_keeps_the_previous_report(evaluation, tmp_path, monkeypatch):
    out = tmp_path / "reports" / "out"
    report.write_report(evaluation, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "render_html", broken)  # fails after the PNG, CSVs and thumbnails
    with pytest.raises(RuntimeError, match="disk on fire"):
        report.write_report(evaluation, out, max_mistakes=1, overwrite=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert _siblings(out) == []

    with pytest.raises(RuntimeError):
        report.write_report(evaluation, tmp_path / "reports" / "fresh")
    assert _siblings(out) == []  # neither the fresh folder nor its staging folder


def test_refuses_a_folder_that_is_not_a_report(evaluation, tmp_path):
    mine = tmp_path / "holiday photos"
    mine.mkdir()
    (mine / "beach.jpg").write_bytes(b"precious")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="holds no earlier retrain report .*never replaces it, even with --overwrite"):
            report.write_report(evaluation, mine, overwrite=overwrite)
    assert (mine / "beach.jpg").read_bytes() == b"precious"
    (tmp_path / "empty").mkdir()
    report.write_report(evaluation, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "index.html").is_file()


def test_confusion_matrix_picture_scales_to_many_classes():
    for n in (2, 30):
        names = [f"class {i} with a rather long descriptive name" for i in range(n)]
        matrix = np.random.default_rng(n).integers(0, 500, size=(n, n))
        picture = report.render_confusion_matrix(names, matrix)
        assert 250 <= picture.width <= 1400 and 200 <= picture.height <= 1400, (n, picture.size)


def test_picture_labels_use_only_drawable_characters():
    from retrain.evaluation import confusion

    drawn = confusion._drawable("Große «café»\tœuvre 猫")
    assert all(c.isascii() or confusion._has_glyph(c) for c in drawn)
    assert drawn.startswith("Grosse ") and "caf" in drawn and drawn.endswith(" oeuvre ?")
    # names that collide once shortened or respelled are numbered as in the per-class table
    picture = report.render_confusion_matrix(["猫", "犬"], [[1, 0], [0, 1]])
    assert picture.width >= 200
