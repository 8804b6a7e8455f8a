"""The checks every written TFLite file gets, and what they need: the test pixels through the one
preprocessing path, the reference probabilities they must reproduce, calibration images.

Each file is run on the test split right after it is written: accuracy (with its interval),
top-1 agreement with the trained model and the largest probability difference, against the
format's own tolerance, plus single-thread latency; a quantized file that loses more than
``max_accuracy_drop`` points against float32 is reported loudly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from .._tf import tf as _tf
from ..data.images import iter_image_batches
from ..evaluation.evaluate import wilson_interval
from ..evaluation.runner import SavedModelRunner, TFLiteRunner
from .tflite import OUTPUT_KEY, TFLITE_FORMATS, export_tflite, tflite_converter


def load_pixels(images, spec, batch_size):
    """uint8 pixels of ``images`` (through the one preprocessing path), in order, for the checks."""
    pixels = [None] * len(images)
    for indices, batch, _ in iter_image_batches(
        [i.path for i in images], [i.decoder for i in images], spec.height, spec.width, batch_size
    ):
        for index, image in zip(indices.tolist(), batch if batch is not None else []):
            pixels[index] = image
    keep = [k for k, p in enumerate(pixels) if p is not None]
    return [images[k] for k in keep], (np.stack([pixels[k] for k in keep]) if keep else None)


def representative_images(images, spec, count: int, seed: int, batch_size: int):
    rng = np.random.default_rng(seed)
    chosen = [images[i] for i in sorted(rng.permutation(len(images))[:count])]
    _, pixels = load_pixels(chosen, spec, batch_size)
    return [] if pixels is None else list(pixels)


LATENCY_IMAGES = 50  # single-image invokes timed per TFLite file


def tflite_figures(tflite_path: Path, reference_probabilities: np.ndarray, pixels: np.ndarray, labels: np.ndarray) -> dict:
    """What a TFLite file computes on the test pixels: accuracy, top-1 agreement with the
    reference (the trained model's probabilities on the same pixels), size."""
    probabilities = TFLiteRunner(tflite_path).predict(pixels)
    predicted = probabilities.argmax(axis=1)
    return {
        "file": tflite_path.name,
        "size_bytes": tflite_path.stat().st_size,
        "accuracy": float((predicted == labels).mean()),
        "accuracy_interval": wilson_interval(int((predicted == labels).sum()), len(labels)),
        "agreement": float((predicted == reference_probabilities.argmax(axis=1)).mean()),
        "max_abs_diff": float(np.abs(probabilities - reference_probabilities).max()),
        "n_images": int(len(pixels)),
    }


def tflite_latency(tflite_path: Path, pixels: np.ndarray) -> dict:
    """Mean time of single-image invokes on one thread (as on a phone's one core), over up to
    ``LATENCY_IMAGES`` test images."""
    single = TFLiteRunner(tflite_path, num_threads=1)
    sample = pixels[:LATENCY_IMAGES]
    single.predict(sample[:1])  # warm-up: delegate preparation and first allocation
    started = time.perf_counter()
    for image in sample:
        single.predict(image[None])
    latency = (time.perf_counter() - started) / len(sample)
    return {"ms_per_image": round(1000.0 * latency, 3), "latency_threads": 1}


@dataclass
class TestSet:
    images: list
    pixels: np.ndarray | None
    labels: np.ndarray | None
    reference: np.ndarray | None  # the trained model's probabilities, which every TFLite file must reproduce


def test_pixels(test_images, spec, batch_size: int) -> tuple[list, np.ndarray | None, np.ndarray | None]:
    images, pixels = load_pixels(test_images, spec, batch_size)
    labels = None if pixels is None else np.asarray([i.label for i in images], np.int64)
    return images, pixels, labels


def test_set(saved_model_dir: Path, test_images, spec, batch_size: int) -> TestSet:
    """Test pixels and the reference probabilities of a SavedModel on disk (``export``)."""
    images, pixels, labels = test_pixels(test_images, spec, batch_size)
    if pixels is None:
        return TestSet(images, None, None, None)
    return TestSet(images, pixels, labels, SavedModelRunner(saved_model_dir).predict(pixels))


def batched(function, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    tf = _tf()
    return np.concatenate([function(tf.constant(pixels[start : start + batch_size]))[OUTPUT_KEY].numpy()
                           for start in range(0, len(pixels), batch_size)])


def write_tflite_variants(source, directory: Path, formats, classes, representative, test: TestSet,
                          max_accuracy_drop: float, metadata: dict,
                          float32_accuracy: float | None = None) -> tuple[dict, dict, list[str]]:
    """Convert each format from ``source`` (the serving model in memory, or a SavedModel folder),
    then check it on the test split. Returns (paths, figures, warnings).

    Quantized variants are compared with float32's accuracy: the one written now, else
    ``float32_accuracy`` (from an earlier export)."""
    paths = write_tflite_files(source, directory, formats, classes, representative, metadata)
    return (paths, *check_tflite_files(paths, test, max_accuracy_drop, float32_accuracy))


def check_tflite_files(paths: dict, test: TestSet, max_accuracy_drop: float, float32_accuracy: float | None = None,
                       beside=None) -> tuple[dict, list[str]]:
    """Each file ({format: path}) on the test split (``tflite_figures``), then its latency
    (``tflite_latency``); returns (figures, warnings), see ``tflite_warnings``. No figures without
    test pixels.

    The files run on a thread of their own (LiteRT lets go of the GIL) while ``beside()`` runs, when
    given (``train`` saves the SavedModel there, which is Python); their latency is timed after,
    on a quiet core."""
    checking = None
    if test.pixels is not None:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tflite-checks")
        checking = pool.submit(lambda: {name: tflite_figures(path, test.reference, test.pixels, test.labels)
                                        for name, path in paths.items()})
        pool.shutdown(wait=False)
    if beside is not None:
        beside()
    figures = checking.result() if checking is not None else {}
    for name, row in figures.items():
        row.update(tflite_latency(paths[name], test.pixels))
    return figures, tflite_warnings(figures, max_accuracy_drop, float32_accuracy)


def write_tflite_files(source, directory: Path, formats, classes, representative, metadata: dict,
                       float32: bytes | None = None) -> dict:
    """Write each format's file from ``source`` (see ``write_tflite_variants``); ``float32``: the
    float32 conversion made already (serving/compose.py), which the formats quantized after
    conversion start from too. Returns {format: path}."""
    converter, converted = tflite_converter(source), ({} if float32 is None else {"float32": float32})
    return {name: export_tflite(source, directory / TFLITE_FORMATS[name].filename, name, classes, representative,
                                metadata, converter, converted) for name in formats}


def tflite_warnings(figures: dict, max_accuracy_drop: float, float32_accuracy: float | None = None) -> list[str]:
    """Each file's drop against float32 (recorded in its figures) and what the run must say of it."""
    warnings = []
    baseline = figures["float32"]["accuracy"] if "float32" in figures else float32_accuracy
    for name, row in figures.items():
        if baseline is not None and name != "float32":
            drop = 100.0 * (baseline - row["accuracy"])
            row["accuracy_drop_points"] = round(drop, 3)
            if drop > max_accuracy_drop:
                warnings.append(
                    f"TFLITE {name.upper()} LOSES {drop:.1f} ACCURACY POINTS against float32 "
                    f"({row['accuracy']:.4f} vs {baseline:.4f}, threshold {max_accuracy_drop:g}): "
                    f"check {row['file']} before shipping it"
                )
        if row["agreement"] < TFLITE_FORMATS[name].agreement_tolerance:
            warnings.append(
                f"tflite {name} agrees with the trained model on only {100 * row['agreement']:.1f}% of test images "
                f"(expected at least {100 * TFLITE_FORMATS[name].agreement_tolerance:.1f}%)"
            )
    missed = [name for name, row in figures.items() if not _faithful(name, row, max_accuracy_drop)]
    if missed:
        warnings.append(_ship_instead(missed, figures, max_accuracy_drop))
    return warnings


def _faithful(name: str, row: dict, max_accuracy_drop: float) -> bool:
    """Within the accuracy drop allowed and the format's agreement with the trained model."""
    return (row.get("accuracy_drop_points", 0.0) <= max_accuracy_drop
            and row["agreement"] >= TFLITE_FORMATS[name].agreement_tolerance)


def _ship_instead(missed: list[str], figures: dict, max_accuracy_drop: float) -> str:
    """Which written file to ship when a quantized one misses: the smallest that passes."""
    passing = [name for name, row in figures.items() if name not in missed and _faithful(name, row, max_accuracy_drop)]
    files = ", ".join(figures[name]["file"] for name in missed)
    if not passing:
        return f"{files}: no TFLite file written passes its checks; ship the SavedModel, or retrain with more images"
    best = min(passing, key=lambda name: figures[name]["size_bytes"])
    row = figures[best]
    hint = "" if "float16" in figures else "; `retrain export OUT --format tflite-float16` may give a smaller one that passes"
    return (f"ship {row['file']} instead of {files} ({100 * row['agreement']:.1f}% agreement, "
            f"{row['size_bytes'] / 1e6:.2f} MB){hint}")


def tflite_metadata(info, classes, fine_tuned: bool = False) -> dict:
    spec = info.input_spec
    module = "fine-tuned module" if fine_tuned else "module"
    return {
        "name": "retrain image classifier",
        "description": f"Classifies {spec.height}x{spec.width} RGB images into {len(classes)} classes "
                       f"with a new head on {module} {info.handle} (fingerprint {info.fingerprint[:16]}).",
        "version": __version__,
        "height": spec.height,
        "width": spec.width,
        "input_description": f"uint8 RGB image, {spec.height}x{spec.width}, resized bilinearly from the original",
        "output_description": f"probabilities of the {len(classes)} classes in labels.txt order",
    }
