"""The Python API: ``train``, ``evaluate``, ``predict``, ``export``. The CLI is a thin layer over it.

The library never prints: it returns dataclasses, and progress goes through ``progress``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from ._tf import tf as _tf
from .augment import DEFAULT_AUGMENTATION, augmented_cache, extract_augmented_bottlenecks
from .bottlenecks import BottleneckCache, clean_stale_temporaries, extract_bottlenecks
from .card import model_card
from .config import TrainConfig
from .dataset import split_dataset
from .errors import AccuracyError, ConfigError, DatasetError, ModelError, OutputError
from .evaluate import (
    Evaluation,
    Prediction,
    classification_metrics,
    evaluate_runner,
    predict_runner,
    small_set_note,
    wilson_interval,
)
from .export import (
    LABELS_FILE,
    OUTPUT_KEY,
    TFLITE_FORMATS,
    build_serving_model,
    export_tflite,
    save_serving_model,
    tflite_converter,
    tflite_format,
)
from .files import make_stage, remove_stage, staged_output, write_atomic
from .finetune import fine_tune, trainable_module_variables
from .head import Head, balanced_class_weights, choose_solver, class_counts, fit_head
from .label_errors import find_label_errors, write_label_error_page
from .images import iter_image_batches
from .module import load_module
from .runner import SavedModelRunner, TFLiteRunner, load_model, read_run_info
from .safety import (MODEL, check_apart, check_cache_folder, check_output_folder, ensure_cache, manifest,
                     written_by_tool)

RUN_FILE = "run.json"
MODEL_CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
SAVED_MODEL_DIR = "saved_model"


@dataclass
class TrainResult:
    output: str
    classes: list[str]
    split: dict  # images per split
    split_per_class: dict
    metrics: dict  # validation / test (SavedModel on test images) / tflite per format
    timings: dict  # seconds per phase
    cache: dict  # hits, misses, corrupt_shards, dir
    module: dict  # handle, fingerprint, input spec, feature dim
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    artifacts: dict = field(default_factory=dict)
    head: dict = field(default_factory=dict)  # solver, seconds; minibatch: epochs; logistic: cross_validation
    label_errors: list[dict] = field(default_factory=list)  # likely mislabelled training images (flagged only)
    class_balance: dict = field(default_factory=dict)  # train images per class, imbalance ratio, class weights
    augment: dict = field(default_factory=dict)  # settings and augmented copies (empty without --augment)
    fine_tune: dict = field(default_factory=dict)  # stage 2 (empty without --fine-tune)

    def to_dict(self) -> dict:
        return asdict(self)


def _package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"retrain": __version__, "python": platform.python_version()}
    for name in ("tensorflow", "keras", "tensorflow-hub", "numpy", "pillow", "ai-edge-litert"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def output_target(output: str | os.PathLike) -> Path:
    """The folder an output path names, symbolic links and ``..`` resolved: the one written."""
    return Path(output).expanduser().resolve()


def check_train_paths(image_dir, output: Path, config: TrainConfig, module: str, overwrite: bool) -> None:
    """Before any work: the output may be replaced, and no folder written overlaps one read."""
    from .module import is_url

    writes = {"output folder": output, "cache folder": config.resolved_cache_dir}
    if is_url(module):  # TF Hub downloads into its cache folder
        from tensorflow_hub.resolver import tfhub_cache_dir

        writes["TF Hub cache folder"] = tfhub_cache_dir(use_temp=True)
    check_apart(
        writes,
        {"image folder": image_dir, "validation folder": config.validation_dir, "test folder": config.test_dir,
         "module folder": None if is_url(module) else module},
    )
    check_output_folder(output_target(output), MODEL, overwrite)
    check_cache_folder(config.resolved_cache_dir)


def _check_unusable(split, skipped, max_fraction: float) -> None:
    """Stop when too much of a class cannot be decoded: the class would be silently under-represented."""
    for index, name in enumerate(split.classes):
        usable = sum(1 for part in (split.train, split.validation, split.test) for i in part if i.label == index)
        bad = [s for s in skipped if s.get("unusable") and s.get("class") == name]
        total = usable + len(bad)
        if bad and len(bad) / total > max_fraction:
            raise DatasetError(
                f"class {name}: {len(bad)} of {total} image files cannot be used (limit {100 * max_fraction:g}%), "
                f"e.g. {bad[0]['path']}: {bad[0]['reason']}"
            )
        if not any(i.label == index for i in split.train):
            raise DatasetError(f"class {name} has no usable training images")


def _fold_validation(split, config: TrainConfig) -> int:
    """Fold the validation images into training when the head is the cross-validated logistic
    regression (which picks its own C) and nothing needs them (fine-tuning keeps its best epoch
    on them). Returns how many were folded in."""
    copies = config.resolved_augment_copies or 0
    n_vectors = (len(split.train) + len(split.validation)) * (1 + copies)
    if (config.keep_validation or config.fine_tune or not split.validation
            or choose_solver(config.head, n_vectors) != "logistic"):
        return 0
    folded = len(split.validation)
    split.train, split.validation = split.train + split.validation, []
    return folded


def _check_min_accuracy(bar: float | None, test: dict | None, output: Path) -> None:
    """--min-accuracy: below the bar nothing is written (an earlier model in OUT stays)."""
    if bar is None:
        return
    if test is None:
        raise ConfigError("--min-accuracy needs test images: use --test-percent above 0 or --test-dir")
    if test["accuracy"] < bar:
        low, high = test["accuracy_interval"]
        raise AccuracyError(
            f"test accuracy {test['accuracy']:.4f} (95% CI {low:.3f}-{high:.3f}, {test['n_images']} images) is below "
            f"--min-accuracy {bar:g}: nothing was written to {output}"
        )


def _arrays(images, vectors, dim):
    x = np.stack([vectors[i.content_hash] for i in images]) if images else np.zeros((0, dim), np.float32)
    y = np.asarray([i.label for i in images], np.int64)
    return x, y


def _load_pixels(images, spec, batch_size):
    """uint8 pixels of ``images`` (through the one preprocessing path), in order, for the checks."""
    pixels = [None] * len(images)
    for indices, batch, _ in iter_image_batches(
        [i.path for i in images], [i.decoder for i in images], spec.height, spec.width, batch_size
    ):
        for index, image in zip(indices.tolist(), batch if batch is not None else []):
            pixels[index] = image
    keep = [k for k, p in enumerate(pixels) if p is not None]
    return [images[k] for k in keep], (np.stack([pixels[k] for k in keep]) if keep else None)


def _representative_images(images, spec, count: int, seed: int, batch_size: int):
    rng = np.random.default_rng(seed)
    chosen = [images[i] for i in sorted(rng.permutation(len(images))[:count])]
    _, pixels = _load_pixels(chosen, spec, batch_size)
    return [] if pixels is None else list(pixels)


LATENCY_IMAGES = 50  # single-image invokes timed per TFLite file


def check_tflite(tflite_path: Path, reference_probabilities: np.ndarray, pixels: np.ndarray, labels: np.ndarray) -> dict:
    """Run a TFLite file on the test pixels: accuracy, top-1 agreement with the reference (the
    trained model's probabilities on the same pixels), size, and mean latency of single-image
    invokes on one CPU thread (as on a phone's one core)."""
    runner = TFLiteRunner(tflite_path)
    probabilities = runner.predict(pixels)
    predicted = probabilities.argmax(axis=1)
    single = TFLiteRunner(tflite_path, num_threads=1)
    sample = pixels[:LATENCY_IMAGES]
    single.predict(sample[:1])  # warm-up: delegate preparation and first allocation
    started = time.perf_counter()
    for image in sample:
        single.predict(image[None])
    latency = (time.perf_counter() - started) / len(sample)
    return {
        "file": tflite_path.name,
        "size_bytes": tflite_path.stat().st_size,
        "accuracy": float((predicted == labels).mean()),
        "accuracy_interval": wilson_interval(int((predicted == labels).sum()), len(labels)),
        "agreement": float((predicted == reference_probabilities.argmax(axis=1)).mean()),
        "max_abs_diff": float(np.abs(probabilities - reference_probabilities).max()),
        "ms_per_image": round(1000.0 * latency, 3),
        "latency_threads": 1,
        "n_images": int(len(pixels)),
    }


@dataclass
class _TestSet:
    images: list
    pixels: np.ndarray | None
    labels: np.ndarray | None
    reference: np.ndarray | None  # the trained model's probabilities, which every TFLite file must reproduce


def _test_pixels(test_images, spec, batch_size: int) -> tuple[list, np.ndarray | None, np.ndarray | None]:
    images, pixels = _load_pixels(test_images, spec, batch_size)
    labels = None if pixels is None else np.asarray([i.label for i in images], np.int64)
    return images, pixels, labels


def _test_set(saved_model_dir: Path, test_images, spec, batch_size: int) -> _TestSet:
    """Test pixels and the reference probabilities of a SavedModel on disk (``export``)."""
    images, pixels, labels = _test_pixels(test_images, spec, batch_size)
    if pixels is None:
        return _TestSet(images, None, None, None)
    return _TestSet(images, pixels, labels, SavedModelRunner(saved_model_dir).predict(pixels))


def _batched(function, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    tf = _tf()
    return np.concatenate([function(tf.constant(pixels[start : start + batch_size]))[OUTPUT_KEY].numpy()
                           for start in range(0, len(pixels), batch_size)])


def write_tflite_variants(source, directory: Path, formats, classes, representative, test: _TestSet,
                          max_accuracy_drop: float, metadata: dict,
                          float32_accuracy: float | None = None) -> tuple[dict, dict, list[str]]:
    """Convert each format from ``source`` (the serving model in memory, or a SavedModel folder),
    then check it on the test split at once. Returns (paths, figures, warnings).

    Quantized variants are compared with float32's accuracy: the one written now, else
    ``float32_accuracy`` (from an earlier export)."""
    paths, figures, warnings = {}, {}, []
    converter = tflite_converter(source)
    for name in formats:
        fmt = TFLITE_FORMATS[name]
        path = export_tflite(source, directory / fmt.filename, name, classes, representative, metadata, converter)
        paths[name] = path
        if test.pixels is not None:
            figures[name] = check_tflite(path, test.reference, test.pixels, test.labels)
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
    return paths, figures, warnings


def _tflite_metadata(info, classes, fine_tuned: bool = False) -> dict:
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


def train(
    image_dir: str | os.PathLike,
    module: str,
    output: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    overwrite: bool = False,
    **options,
) -> TrainResult:
    """Train a classifier on ``image_dir`` with ``module`` as a frozen feature extractor and
    write it to ``output``. Options are ``TrainConfig`` fields.

    With ``fine_tune``, a second stage then trains the module's weights too (see finetune.py);
    with ``augment``, the head also learns from cached augmented copies of the training images."""
    config = replace(config, **options) if config is not None else TrainConfig.from_options(**options)
    for name in config.quantize:
        tflite_format(name)
    output = Path(output).expanduser()
    check_train_paths(image_dir, output, config, module, overwrite)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    split = split_dataset(image_dir, config.validation_percent, config.test_percent, config.validation_dir, config.test_dir)
    timings["scan"] = time.perf_counter() - started
    if config.fine_tune and not split.validation:
        raise ConfigError("--fine-tune needs validation images to keep only improvements: "
                          "use --validation-percent above 0 or --validation-dir")

    mark = time.perf_counter()
    loaded = load_module(module, config.image_size, config.allow_unversioned, config.trust_hosts,
                         records_dir=config.resolved_cache_dir)
    spec = loaded.info.input_spec
    check_apart({"output folder": output, "cache folder": config.resolved_cache_dir},
                {"module folder": loaded.info.path})  # a URL's folder in the TF Hub cache
    if config.fine_tune:
        trainable_module_variables(loaded)  # a module that cannot be fine-tuned fails before any work
    timings["module"] = time.perf_counter() - mark

    mark = time.perf_counter()
    cache_root = ensure_cache(config.resolved_cache_dir)
    clean_stale_temporaries(cache_root)
    cache = BottleneckCache(cache_root, loaded.info.fingerprint, spec.key())
    everything = split.train + split.validation + split.test
    batch = config.batch_for_images(spec.height, spec.width)
    bottlenecks = extract_bottlenecks(everything, loaded, cache, batch)
    timings["bottlenecks"] = time.perf_counter() - mark

    classes_by_path = {image.path: split.classes[image.label] for image in everything}
    skipped = list(split.skipped) + [
        {**item, "class": classes_by_path.get(item["path"]), "unusable": True} for item in bottlenecks.skipped
    ]
    for name in ("train", "validation", "test"):
        setattr(split, name, [i for i in getattr(split, name) if i.content_hash in bottlenecks.vectors])
    _check_unusable(split, skipped, config.max_unusable_fraction)
    dim = loaded.info.feature_dim
    n_classes = len(split.classes)
    folded = _fold_validation(split, config)

    train_x, train_y = _arrays(split.train, bottlenecks.vectors, dim)
    val_x, val_y = _arrays(split.validation, bottlenecks.vectors, dim)
    augment_record, augmented = {}, None
    copies = config.resolved_augment_copies
    if config.augment:
        augment_record = {"settings": DEFAULT_AUGMENTATION.to_dict(), "copies": copies,
                          "on_the_fly": config.fine_tune}
    if copies:
        # Training images only: validation and test stay as they are.
        mark = time.perf_counter()
        augmented_store = augmented_cache(cache_root, loaded.info, DEFAULT_AUGMENTATION)
        augmented, copy_keys = extract_augmented_bottlenecks(split.train, loaded, augmented_store, copies,
                                                             DEFAULT_AUGMENTATION, batch)
        timings["augment"] = time.perf_counter() - mark
        augment_record["cache"] = {"hits": augmented.hits, "misses": augmented.misses,
                                   "corrupt_shards": len(augmented.corrupt_shards), "dir": str(augmented_store.dir)}
        copy_x = np.stack([augmented.vectors[key] for keys in copy_keys for key in keys])
        head_x, head_y = np.concatenate([train_x, copy_x]), np.concatenate([train_y, np.repeat(train_y, copies)])
        # an image and its copies share a cross-validation fold
        groups = np.concatenate([np.arange(len(train_y)), np.repeat(np.arange(len(train_y)), copies)])
    else:
        head_x, head_y, groups = train_x, train_y, None

    counts = class_counts(train_y, n_classes)
    class_weights = balanced_class_weights(train_y, n_classes) if config.class_weight == "balanced" else None
    class_balance = {
        "class_counts": {name: int(count) for name, count in zip(split.classes, counts)},
        "imbalance_ratio": round(float(counts.max() / max(counts.min(), 1)), 3),
        "class_weight": config.class_weight,
        "class_weights": None if class_weights is None else {split.classes[c]: round(w, 4) for c, w in class_weights.items()},
    }

    # The test images are decoded for the export checks while the head trains: tf.data decodes
    # on the core the head leaves idle.
    decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-pixels")
    test_decoding = decoder.submit(_test_pixels, split.test, spec, batch)
    decoder.shutdown(wait=False)
    mark = time.perf_counter()
    head = fit_head(head_x, head_y, val_x, val_y, n_classes, config, class_weights, groups)
    timings["train"] = time.perf_counter() - mark
    kernel, bias = head.kernel, head.bias
    head_record = {**head.record(), "training_vectors": int(len(head_x)), "validation_folded": folded}

    metrics: dict = {}
    if len(val_x):
        metrics["validation"] = classification_metrics(val_y, head.probabilities(val_x).argmax(1), split.classes)
    cv = head.cross_validation
    if cv and cv.get("folds"):
        correct = int(round(cv["accuracy"] * cv["n_images"]))
        metrics["cross_validation"] = {"accuracy": cv["accuracy"], "n_images": cv["n_images"],
                                       "accuracy_interval": wilson_interval(correct, cv["n_images"]),
                                       "folds": cv["folds"], "c": cv["c"]}
    label_errors = [] if head.out_of_fold is None else find_label_errors(split.train, head.out_of_fold, split.classes)

    module_record = {**loaded.info.to_dict(), "weights_changed": False}
    fine_record: dict = {}
    if config.fine_tune:
        # Every bottleneck is computed and cached above: the cache never sees changed weights.
        mark = time.perf_counter()
        fine = fine_tune(loaded, head.kernel, head.bias, split.train, split.validation, n_classes, config,
                         class_weights, DEFAULT_AUGMENTATION if config.augment else None)
        timings["fine_tune"] = time.perf_counter() - mark
        kernel, bias = fine.kernel, fine.bias
        fine_record = fine.to_dict()
        module_record["weights_changed"] = fine.weights_changed
        module_record["weights_fingerprint"] = fine.weights_fingerprint
        metrics["validation"] = classification_metrics(
            fine.validation_labels, fine.validation_probabilities.argmax(1), split.classes)
        if not fine.weights_changed:
            split.warnings.append(
                f"fine-tuning did not improve validation in {fine.epochs_run} epoch(s) (frozen module: loss "
                f"{fine.frozen_validation['loss']:.4f}, accuracy {fine.frozen_validation['accuracy']:.4f}): "
                "the frozen module's weights were kept"
            )

    mark = time.perf_counter()
    with staged_output(output_target(output), MODEL) as stage:
        labels_path = stage / LABELS_FILE
        labels_path.write_text("\n".join(split.classes) + "\n", encoding="utf-8")
        serving = build_serving_model(loaded, kernel, bias, str(labels_path))
        save_serving_model(serving, stage / SAVED_MODEL_DIR)
        artifacts = {"saved_model": str(output / SAVED_MODEL_DIR), "labels": str(output / LABELS_FILE)}

        # The reference every TFLite file is checked against. Frozen module: the head on the test
        # images' cached bottlenecks, which is what the saved graph computes (resize aside: the
        # pixels are already at the module's size) and what training saw. Fine-tuned module: the
        # cached vectors are the frozen module's, so the serving model in memory (the one just
        # saved) is run on the test pixels.
        test_images, test_pixels, test_labels = test_decoding.result()
        test = _TestSet(test_images, test_pixels, test_labels, None)
        if test_pixels is not None:
            if module_record["weights_changed"]:
                test.reference = _batched(serving.serve_fixed, test_pixels, batch)
                source = "fine-tuned serving model (the saved one, in memory) on the test images"
            else:
                test_x, _ = _arrays(test_images, bottlenecks.vectors, dim)
                test.reference = Head.probabilities_of(test_x, kernel, bias)
                source = "head on the test images' cached bottlenecks (what the SavedModel computes)"
            metrics["test"] = classification_metrics(test.labels, test.reference.argmax(1), split.classes)
            metrics["test"]["source"] = source
            note = small_set_note(metrics["test"]["n_images"])
            if note:
                split.warnings.append(note)
        _check_min_accuracy(config.min_accuracy, metrics.get("test"), output)

        formats = ["float32"] + [f for f in config.quantize if f != "float32"]
        representative = None
        if any(TFLITE_FORMATS[f].needs_representative for f in formats):
            representative = _representative_images(split.train, spec, config.calibration_samples, config.seed, batch)
        tflite_metadata = _tflite_metadata(loaded.info, split.classes, module_record["weights_changed"])
        paths, metrics["tflite"], tflite_warnings = write_tflite_variants(
            serving, stage, formats, split.classes, representative, test, config.max_accuracy_drop, tflite_metadata
        )
        split.warnings.extend(tflite_warnings)
        if label_errors:
            write_label_error_page(label_errors, stage, split.classes)
            artifacts["label_errors"] = str(output / "label_errors.html")
        for name, path in paths.items():
            artifacts[f"tflite_{name}"] = str(output / path.name)
        timings["export"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - started

        artifacts["run"] = str(output / RUN_FILE)
        artifacts["model_card"] = str(output / MODEL_CARD_FILE)
        artifacts["metrics"] = str(output / METRICS_FILE)
        result = TrainResult(
            output=str(output),
            classes=list(split.classes),
            split=split.counts(),
            split_per_class=split.counts_per_class(),
            metrics=metrics,
            timings={k: round(v, 3) for k, v in timings.items()},
            cache={
                "hits": bottlenecks.hits,
                "misses": bottlenecks.misses,
                "corrupt_shards": len(bottlenecks.corrupt_shards),
                "dir": str(cache.dir),
            },
            module=module_record,
            skipped=skipped,
            warnings=list(split.warnings),
            artifacts=artifacts,
            head=head_record,
            label_errors=label_errors,
            class_balance=class_balance,
            augment=augment_record,
            fine_tune=fine_record,
        )
        run = {
            "tool": "retrain",
            "output_kind": "model",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "image_dir": str(Path(image_dir).expanduser().resolve()),
            "config": config.to_dict(),
            "module": result.module,
            "classes": result.classes,
            "split": result.split,
            "split_per_class": result.split_per_class,
            "head": result.head,
            "label_errors": label_errors,
            "class_balance": class_balance,
            "augment": augment_record,
            "fine_tune": fine_record,
            "metrics_file": METRICS_FILE,
            "cache": {"hits": bottlenecks.hits, "misses": bottlenecks.misses},
            "skipped": skipped,
            "versions": _package_versions(),
        }
        (stage / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (stage / MODEL_CARD_FILE).write_text(model_card(run, metrics))
        # Written last: the marker that makes the folder replaceable by a later run, listing every file.
        run["files"] = manifest(stage, MODEL)
        (stage / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
    return result


def evaluate(model: str | os.PathLike, image_dir: str | os.PathLike, batch_size: int = 64) -> Evaluation:
    """Accuracy, per-class figures and confusion matrix of a model (output folder, SavedModel or .tflite)."""
    return evaluate_runner(load_model(model), image_dir, batch_size)


def predict(model: str | os.PathLike, images, top_k: int = 1, batch_size: int = 64) -> list[Prediction]:
    """Top-k classes for image files (or folders of them)."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    return predict_runner(load_model(model), images, top_k, batch_size)


def export(output: str | os.PathLike, formats=("float32",), representative_dir: str | os.PathLike | None = None,
           calibration_samples: int | None = None, max_accuracy_drop: float | None = None) -> dict:
    """(Re)write TFLite variants of an output folder from its SavedModel, check each on the run's
    test split (recomputed from run.json: the split is stable) and update metrics.json and the
    model card. Returns {"artifacts": {format: path}, "tflite": {format: figures}, "warnings": [...]}."""
    from .dataset import scan_folder
    from .module import InputSpec, ModuleInfo

    output = Path(output).expanduser()
    run = read_run_info(output)
    if not MODEL.owns(run):
        raise ModelError(f"{output} is not a retrain output folder: its {RUN_FILE} was not written by retrain")
    check_apart({"output folder": output}, {"representative folder": representative_dir})
    fmts = [tflite_format(f) for f in formats]
    for fmt in fmts:  # files of these names are replaced: only those retrain wrote
        final = output / fmt.filename
        if (final.exists() or final.is_symlink()) and not written_by_tool(fmt.filename, MODEL, run):
            raise OutputError(f"{final} was not written by retrain: move it out of {output} and export again")
    saved_model = output / SAVED_MODEL_DIR
    if not (saved_model / "saved_model.pb").exists():
        raise ModelError(f"{output} has no {SAVED_MODEL_DIR}/: not a retrain output folder")
    classes = run["classes"]
    config = run["config"]
    spec_data = run["module"]["input_spec"]
    spec = InputSpec(**{**spec_data, "value_range": tuple(spec_data["value_range"])})
    known = {f.name for f in dataclasses.fields(ModuleInfo)}  # run.json's module record has more (weights_changed...)
    info = ModuleInfo(**{**{k: v for k, v in run["module"].items() if k in known}, "input_spec": spec})
    split = None
    if Path(run["image_dir"]).is_dir():
        split = split_dataset(run["image_dir"], config["validation_percent"], config["test_percent"],
                              config.get("validation_dir"), config.get("test_dir"))
    representative = None
    if any(f.needs_representative for f in fmts):
        if representative_dir or split is None:
            source = representative_dir or run["image_dir"]
            scan = scan_folder(source, classes=classes, role="representative folder")
            if not scan.images:
                raise DatasetError(f"representative folder {scan.root} has no usable images")
            candidates = scan.images
        else:
            candidates = split.train  # as in training: calibration never sees test images
        count = calibration_samples or config.get("calibration_samples", 200)
        representative = _representative_images(candidates, spec, count, config.get("seed", 0), 64)
    test_images = split.test if split is not None else []
    test = _test_set(saved_model, test_images, spec, 64) if test_images else _TestSet([], None, None, None)
    threshold = config.get("max_accuracy_drop", 2.0) if max_accuracy_drop is None else max_accuracy_drop
    metrics_path = output / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    previous_float32 = metrics.get("tflite", {}).get("float32", {}).get("accuracy")
    scratch = make_stage(output_target(output))  # beside the folder: a killed run leaves nothing inside it
    try:
        paths, figures, warnings = write_tflite_variants(
            saved_model, scratch, [f.name for f in fmts], classes, representative, test, threshold,
            _tflite_metadata(info, classes, run["module"].get("weights_changed", False)), previous_float32,
        )
        written = {}
        for name, path in paths.items():
            final = output / path.name
            os.replace(path, final)
            written[name] = str(final)
    finally:
        remove_stage(scratch)
    if isinstance(run.get("files"), list):
        run["files"] = sorted(set(run["files"]) | {Path(p).name for p in written.values()})
        write_atomic(output / RUN_FILE, json.dumps(run, indent=2) + "\n")
    if split is None:
        warnings.append(f"training folder {run['image_dir']} is gone: the new files were not checked on the test split")
    elif not test_images:
        warnings.append("the run has no test split: the new files were not checked")
    metrics.setdefault("tflite", {}).update(figures)
    write_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    write_atomic(output / MODEL_CARD_FILE, model_card(run, metrics))
    return {"artifacts": written, "tflite": figures, "warnings": warnings}
