"""Metrics for a model on labelled images: accuracy, per-class precision / recall / F1, confusion matrix."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import progress
from ..data.dataset import scan_folder
from ..errors import DatasetError
from ..data.images import IMAGE_EXTENSIONS, iter_image_batches, probe_image


SMALL_TEST_SET = 30  # fewer images than this cannot tell models apart: said in one line


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> list[float]:
    """95 % Wilson score interval of an accuracy of ``correct`` out of ``n`` (sound at 0, 1 and small n)."""
    if n <= 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(float(max(0.0, centre - half)), 6), round(float(min(1.0, centre + half)), 6)]


def accuracy_text(accuracy: float, n: int, interval) -> str:
    """"0.9440 (95% CI 0.905-0.968, 215 images)": how every accuracy is printed."""
    return f"{accuracy:.4f} (95% CI {interval[0]:.3f}-{interval[1]:.3f}, {n} images)"


def small_set_note(n: int, what: str = "test") -> str | None:
    """One line when ``n`` images are too few for the accuracy to tell models apart."""
    if n >= SMALL_TEST_SET:
        return None
    return (f"only {n} {what} images: too few to tell models apart (under {SMALL_TEST_SET}; "
            "its 95% interval is wide); add images or use --test-dir")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class figures and the confusion matrix (rows = true class, in ``classes`` order)."""
    n = len(classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    per_class = {}
    for index, name in enumerate(classes):
        tp = int(matrix[index, index])
        predicted = int(matrix[:, index].sum())
        support = int(matrix[index].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    total = int(matrix.sum())
    present = [c for c in classes if per_class[c]["support"]]
    return {
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "n_images": total,
        "accuracy_interval": wilson_interval(int(np.trace(matrix)), total),
        "macro_f1": float(np.mean([per_class[c]["f1"] for c in present])) if present else 0.0,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def run_on_files(runner, paths: list[str], decoders: list[str], batch_size: int = 64, desc: str = "evaluate"):
    """Probabilities for each decodable file: returns (indices, probabilities, skipped[(index, reason)])."""
    all_indices, all_probabilities, all_skipped = [], [], []
    with progress.bar(total=len(paths), desc=desc, unit="img") as bar:
        batches = iter_image_batches(paths, decoders, runner.height, runner.width, batch_size,
                                     tensorflow=getattr(runner, "uses_tensorflow", True))
        for indices, pixels, skipped in batches:
            all_skipped.extend(skipped)
            if pixels is not None and len(indices):
                all_indices.append(indices)
                all_probabilities.append(runner.predict(pixels))
            bar.update(len(indices) + len(skipped))
    if not all_indices:
        return np.zeros(0, np.int64), np.zeros((0, len(runner.classes)), np.float32), all_skipped
    return np.concatenate(all_indices), np.concatenate(all_probabilities), all_skipped


@dataclass
class ImageRecord:
    """One evaluated image: where it is, its true label index, the model's probabilities."""

    path: str
    label: int
    probabilities: np.ndarray

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def confidence(self) -> float:
        return float(np.max(self.probabilities))


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Fraction of images whose true class is among the k most probable."""
    if len(labels) == 0:
        return 0.0
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(axis=1).mean())


@dataclass
class Evaluation:
    model: str
    kind: str
    classes: list[str]
    accuracy: float
    n_images: int
    accuracy_interval: list  # 95 % Wilson interval [low, high]
    macro_f1: float
    per_class: dict
    confusion_matrix: list
    top_k_accuracy: dict = field(default_factory=dict)  # {"top_1": ..., "top_5": ...}
    skipped: list[dict] = field(default_factory=list)
    records: list[ImageRecord] = field(default_factory=list, repr=False)  # per image; not in to_dict()

    def to_dict(self) -> dict:
        data = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "records"}
        return json_safe(data)


def json_safe(value):
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def evaluate_runner(runner, image_dir: str | os.PathLike, batch_size: int = 64) -> Evaluation:
    scan = scan_folder(image_dir, classes=runner.classes, role="evaluation folder")
    if not scan.images:
        raise DatasetError(f"evaluation folder {scan.root} has no usable images")
    paths = [i.path for i in scan.images]
    indices, probabilities, skipped = run_on_files(runner, paths, [i.decoder for i in scan.images], batch_size)
    y_true = np.asarray([scan.images[i].label for i in indices], np.int64)
    metrics = classification_metrics(y_true, probabilities.argmax(axis=1), runner.classes)
    ks = sorted({k for k in (1, 3, 5) if k <= len(runner.classes)})
    return Evaluation(
        model=runner.path,
        kind=runner.kind,
        classes=list(runner.classes),
        top_k_accuracy={f"top_{k}": top_k_accuracy(y_true, probabilities, k) for k in ks},
        skipped=scan.skipped + [{"path": paths[i], "reason": r} for i, r in skipped],
        records=[ImageRecord(paths[i], int(y), p) for i, y, p in zip(indices.tolist(), y_true.tolist(), probabilities)],
        **metrics,
    )


@dataclass
class Prediction:
    path: str
    top: list[dict]  # [{"class": name, "probability": p}], best first
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def expand_inputs(inputs) -> list[str]:
    """Files as given; folders expanded to their image files (recursively, sorted)."""
    paths: list[str] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            paths.extend(
                str(p) for p in sorted(item.rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
        else:
            paths.append(str(item))
    return paths


def predict_runner(runner, inputs, top_k: int = 1, batch_size: int = 64) -> list[Prediction]:
    paths = expand_inputs(inputs)
    if not paths:
        raise DatasetError("no images to predict: give image files or folders that contain images")
    top_k = max(1, min(top_k, len(runner.classes)))
    decoders, errors = [], {}
    for index, path in enumerate(paths):
        try:
            with open(path, "rb") as handle:
                probe = probe_image(handle.read())
        except OSError as error:
            errors[index] = f"cannot read: {error.strerror or error}"
            decoders.append("skip")
            continue
        if probe.problem:
            errors[index] = probe.problem
            decoders.append("skip")
        else:
            decoders.append(probe.decoder)
    usable = [i for i, d in enumerate(decoders) if d != "skip"]
    results: dict[int, Prediction] = {}
    if usable:
        indices, probabilities, skipped = run_on_files(
            runner, [paths[i] for i in usable], [decoders[i] for i in usable], batch_size, desc="predict"
        )
        for local, row in zip(indices.tolist(), probabilities):
            order = np.argsort(-row, kind="stable")[:top_k]
            top = [{"class": runner.classes[j], "probability": float(row[j])} for j in order]
            results[usable[local]] = Prediction(paths[usable[local]], top)
        for local, reason in skipped:
            errors[usable[local]] = reason
    for index, reason in errors.items():
        results[index] = Prediction(paths[index], [], reason)
    return [results[i] for i in range(len(paths))]
