"""Part "few-shot": head accuracy from a few photos per class, against the linear-probe limit.

On the same cached vectors of the real module, three heads side by side:

- **new**: ``retrain.training.head.fit_head`` with the tool's defaults, on every training image (the
  default run folds its validation split into training, since cross-validation picks C);
- **old**: the minibatch head with the previous defaults (``--head minibatch``: Adam, 100 epochs,
  early stopping on a tenth of the images held out for validation, at least one per class);
- **reference**: scikit-learn's ``LogisticRegressionCV`` (L-BFGS), C from {0.01 ... 30} by
  stratified 5-fold cross-validation on the training vectors, then refit: the linear-probe
  protocol, written with scikit-learn's own CV class rather than the tool's loop.

Subsets are nested: the first N files of each class (sorted by name). Cats vs dogs is evaluated
on the 1,000 images of its validation folder; flowers_128 on a fixed held-out part (the files
whose name hash falls in the last 30 %). Target: the new head within 0.5 points of the reference
at every size, and never more than 0.5 points below the old head.

    python -m bench.run --only few-shot
"""

from __future__ import annotations

import hashlib
import time

from .common import BenchError, Context, Row

SIZES = {"cats_vs_dogs": [5, 10, 30, 100, 1000], "flowers": [10, 30, 100]}
QUICK_SIZES = {"cats_vs_dogs": [5, 10, 30], "flowers": [10, 30]}
TOLERANCE_POINTS = 0.5
AUGMENT_UP_TO = 100  # images per class up to which --augment is measured on top of the new head
GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def _held_out(relpath: str) -> bool:
    return int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF >= 0.7


def _vectors(images, module, cache):
    import numpy as np

    from retrain.features.bottlenecks import extract_bottlenecks

    found = extract_bottlenecks(images, module, cache).vectors
    return (np.stack([found[i.content_hash] for i in images]).astype(np.float32),
            np.asarray([i.label for i in images], np.int64))


def _augmented(images, module, store):
    import numpy as np

    from retrain.data.augment import DEFAULT_AUGMENTATION, extract_augmented_bottlenecks
    from retrain.config import AUGMENT_COPIES

    found, keys = extract_augmented_bottlenecks(images, module, store, AUGMENT_COPIES, DEFAULT_AUGMENTATION)
    return np.stack([found.vectors[key] for row in keys for key in row]).astype(np.float32)


def _first_per_class(images, n: int):
    chosen = []
    for label in sorted({i.label for i in images}):
        chosen += sorted((i for i in images if i.label == label), key=lambda i: i.relpath)[:n]
    return chosen


def _datasets(ctx: Context):
    """{name: (training images, held-out images)}: ImageFile lists from the tool's own scan."""
    from retrain.data.dataset import scan_folder

    cats = ctx.data / "cats_and_dogs_filtered"
    flowers = ctx.data / "flowers_128"
    missing = [str(p) for p in (cats / "train", cats / "validation", flowers) if not p.is_dir()]
    if missing:
        raise BenchError(f"data missing: {', '.join(missing)}")
    flower_scan = scan_folder(flowers)
    return {
        "cats_vs_dogs": (scan_folder(cats / "train").images, scan_folder(cats / "validation").images),
        "flowers": ([i for i in flower_scan.images if not _held_out(i.relpath)],
                    [i for i in flower_scan.images if _held_out(i.relpath)]),
    }


def _old_head(images, x, y, n_classes):
    """The previous defaults: minibatch head, a tenth of the images (at least 1 per class) for validation."""
    import numpy as np

    from retrain.config import TrainConfig
    from retrain.training.head import train_head_minibatch

    validation = np.zeros(len(y), bool)
    for label in range(n_classes):
        rows = [r for r in range(len(y)) if y[r] == label]
        ranked = sorted(rows, key=lambda r: hashlib.sha1(images[r].relpath.encode()).hexdigest())
        validation[ranked[: max(1, len(rows) // 10)]] = True
    head = train_head_minibatch(x[~validation], y[~validation], x[validation], y[validation], n_classes,
                                TrainConfig(head="minibatch"))
    return head.kernel, head.bias


def _reference(x, y, seed: int = 0):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    import numpy as np

    folds = min(5, int(np.bincount(y).min()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 announces new defaults; these are pinned
        model = LogisticRegressionCV(Cs=list(GRID), scoring="accuracy", cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                     max_iter=1000).fit(x, y)
    return model


def run(ctx: Context) -> tuple[dict, list[Row]]:
    import numpy as np

    from retrain import progress
    from retrain.data.augment import DEFAULT_AUGMENTATION, augmented_cache
    from retrain.features.bottlenecks import BottleneckCache
    from retrain.config import TrainConfig
    from retrain.training.head import Head, fit_head
    from retrain.features.module import load_module

    progress.set_enabled(False)
    module = load_module(str(ctx.module))
    cache = BottleneckCache(ctx.work / "cache-fewshot", module.info.fingerprint, module.info.input_spec.key())
    augmented_store = augmented_cache(ctx.work / "cache-fewshot", module.info, DEFAULT_AUGMENTATION)
    sizes = QUICK_SIZES if ctx.quick else SIZES
    measured, rows = [], []
    for name, (train_images, test_images) in _datasets(ctx).items():
        n_classes = len({i.label for i in test_images})
        test_x, test_y = _vectors(test_images, module, cache)
        for n in sizes[name]:
            images = _first_per_class(train_images, n)
            x, y = _vectors(images, module, cache)
            accuracy, seconds = {}, {}

            started = time.perf_counter()
            head = fit_head(x, y, None, None, n_classes, TrainConfig())
            seconds["new"] = time.perf_counter() - started
            accuracy["new"] = float((head.probabilities(test_x).argmax(1) == test_y).mean())

            if n <= AUGMENT_UP_TO:  # --augment on top of the new head: 5 cached augmented copies per image
                copies_x = _augmented(images, module, augmented_store)
                copies = len(copies_x) // len(images)
                groups = np.concatenate([np.arange(len(y)), np.repeat(np.arange(len(y)), copies)])
                augmented = fit_head(np.concatenate([x, copies_x]), np.concatenate([y, np.repeat(y, copies)]),
                                     None, None, n_classes, TrainConfig(augment=True), groups=groups)
                accuracy["augment"] = float((augmented.probabilities(test_x).argmax(1) == test_y).mean())

            started = time.perf_counter()
            kernel, bias = _old_head(images, x, y, n_classes)
            seconds["old"] = time.perf_counter() - started
            accuracy["old"] = float((Head.probabilities_of(test_x, kernel, bias).argmax(1) == test_y).mean())

            started = time.perf_counter()
            reference = _reference(x.astype(np.float64), y)
            seconds["reference"] = time.perf_counter() - started
            accuracy["reference"] = float((reference.predict(test_x.astype(np.float64)) == test_y).mean())

            row = {"dataset": name, "per_class": n, "train_images": len(images), "test_images": len(test_images),
                   "accuracy": {k: round(v, 4) for k, v in accuracy.items()},
                   "seconds": {k: round(v, 2) for k, v in seconds.items()},
                   "c": {"new": head.cross_validation["c"], "reference": float(np.atleast_1d(reference.C_)[0])}}
            measured.append(row)
            gap_reference = 100 * (accuracy["new"] - accuracy["reference"])
            gap_old = 100 * (accuracy["new"] - accuracy["old"])
            ok = gap_reference >= -TOLERANCE_POINTS and gap_old >= -TOLERANCE_POINTS
            rows.append(Row(
                "7 few-shot", f"{name} {n}/class: new / old / LR-CV (head s)",
                f"{accuracy['new']:.3f} / {accuracy['old']:.3f} / {accuracy['reference']:.3f} "
                f"({seconds['new']:.1f} / {seconds['old']:.1f} / {seconds['reference']:.1f})",
                f"new >= LR-CV and old - {TOLERANCE_POINTS} pt", ok))
            if "augment" in accuracy:
                rows.append(Row("7 few-shot", f"{name} {n}/class: new head with --augment (5 copies)",
                                f"{accuracy['augment']:.3f} ({100 * (accuracy['augment'] - accuracy['new']):+.1f} pt)"))
    return {"sizes": measured, "tolerance_points": TOLERANCE_POINTS, "grid": list(GRID)}, rows


def markdown_table(measured: list[dict]) -> str:
    """The README's table from a run's ``sizes``."""
    lines = ["| data | images per class | new head | old head | CV-tuned LR | new + --augment | head s (new / old / LR) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in measured:
        a, s = m["accuracy"], m["seconds"]
        augment = f"{a['augment']:.3f}" if "augment" in a else "–"
        lines.append(f"| {m['dataset']} | {m['per_class']} | {a['new']:.3f} | {a['old']:.3f} | {a['reference']:.3f} | "
                     f"{augment} | {s['new']:.1f} / {s['old']:.1f} / {s['reference']:.1f} |")
    return "\n".join(lines)


__all__ = ["run", "markdown_table"]
