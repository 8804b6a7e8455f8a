"""``train`` as named stages, in the order of the README's data-flow picture:

    prepare -> features -> head -> fine-tune -> export -> records

Each stage is a function that takes what the earlier ones made and returns a small dataclass;
``train`` only calls them in order. Every check that can refuse the run (paths, options, the
module) happens in ``prepare``, before any image is read; nothing is written to the output
folder until ``export``, which writes into a staging folder moved into place when complete.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .data.augment import DEFAULT_AUGMENTATION, augmented_cache, extract_augmented_bottlenecks
from .data.dataset import Split, split_dataset
from .distribute import choose_devices
from .errors import AccuracyError, ConfigError, DatasetError
from .evaluation.evaluate import classification_metrics, small_set_note, wilson_interval
from .evaluation.label_errors import PAGE as LABEL_ERRORS_PAGE
from .evaluation.label_errors import find_label_errors, write_label_error_page
from .features.ahead import decode_ahead
from .features.bottlenecks import BottleneckCache, clean_stale_temporaries, extract_bottlenecks
from .features.vectors import StoredVectors
from .features.lite import ExtractionBackend
from .features.module import LoadedModule, check_module, fingerprint, load_module
from .files import staged_output
from .records import MODEL_CARD_FILE, METRICS_FILE, RUN_FILE, SAVED_MODEL_DIR, Stopwatch, TrainResult, write_records
from .safety import MODEL, check_apart, check_cache_folder, check_output_folder, ensure_cache
from .serving.checks import (TestSet, batched, check_tflite_files, representative_images, test_pixels, tflite_metadata,
                             write_tflite_files)
from .serving.compose import MADE_BY_CONVERTER, float32_from_module
from .serving.tflite import (LABELS_FILE, TFLITE_FORMATS, build_serving_model, save_serving_model, tflite_format,
                             traced_serving_model)
from .training.finetune import fine_tune, trainable_module_variables
from .training.head import Head, balanced_class_weights, choose_solver, class_counts, fit_head, should_stream
from .training.logistic import import_solver_ahead

# --- prepare: every refusal before any work -------------------------------------------------------


@dataclass
class Prepared:
    config: TrainConfig
    output: Path  # as given (artifacts name it so)
    split: Split
    module: LoadedModule
    batch: int  # images per module call (per device: with several replicas, extraction calls take batch x replicas)
    replicas: object = None  # distribute.Replicas on several devices; None on one (no strategy)
    looked_up: object = None  # bottlenecks.LookedUp: the cache's part of the images, looked up while the module loaded
    ahead: object = None  # ahead.DecodedAhead: the images to compute, decoding while the module loaded
    backend: ExtractionBackend | None = None  # on one device: its LiteRT conversion started beside the module's probe


def output_target(output: str | os.PathLike) -> Path:
    """The folder an output path names, symbolic links and ``..`` resolved: the one written."""
    return Path(output).expanduser().resolve()


def check_train_paths(image_dir, output: Path, config: TrainConfig, module: str, overwrite: bool) -> None:
    """The output may be replaced, and no folder written overlaps one read (safety.py)."""
    from .features.module import is_url

    writes = {"output folder": output, "cache folder": config.resolved_cache_dir}
    if is_url(module):  # TF Hub downloads into its cache folder
        from tensorflow_hub.resolver import tfhub_cache_dir

        writes["TF Hub cache folder"] = tfhub_cache_dir(use_temp=True)
    check_apart(writes, {"image folder": image_dir, "validation folder": config.validation_dir,
                         "test folder": config.test_dir, "module folder": None if is_url(module) else module})
    check_output_folder(output_target(output), MODEL, overwrite)
    check_cache_folder(config.resolved_cache_dir)


def prepare(image_dir, module: str, output, config: TrainConfig, overwrite: bool, watch: Stopwatch) -> Prepared:
    """Options, paths, the scan and split, and the module: everything that can refuse the run."""
    for name in config.quantize:
        tflite_format(name)
    output = Path(output).expanduser()
    check_train_paths(image_dir, output, config, module, overwrite)
    with watch("module"):  # trust and the op audit refuse a module before any image is read
        checked = check_module(module, config.allow_unversioned, config.trust_hosts, config.allowed_module_ops)
    with watch("scan"):
        split = split_dataset(image_dir, config.validation_percent, config.test_percent, config.validation_dir,
                              config.test_dir)
    if config.fine_tune and not split.validation:
        raise ConfigError("--fine-tune needs validation images to keep only improvements: "
                          "use --validation-percent above 0 or --validation-dir")
    replicas = choose_devices(config.devices, config.extract_backend)
    with watch("module"):
        path, audit = checked
        digest = fingerprint(path)
        # The images to compute are decoded on the idle core while the module loads (features/ahead.py).
        everything = split.train + split.validation + split.test
        looked_up, ahead = (None, None) if replicas is not None else decode_ahead(everything, config, audit, digest)
        backends = []

        def convert_ahead(traced):  # the conversion for LiteRT, when it will be wanted, beside the probe
            backends.append(ExtractionBackend(traced, config.resolved_cache_dir, config.extract_backend,
                                              converted_anyway=not config.fine_tune))
            backends[0].convert_ahead(len(looked_up.todo))

        try:
            loaded = load_module(module, config.image_size, config.allow_unversioned, config.trust_hosts,
                                 records_dir=config.resolved_cache_dir, allowed_ops=config.allowed_module_ops,
                                 slim_dir=None if config.fine_tune else config.resolved_cache_dir,
                                 checked=(path, audit, digest), on_traced=None if ahead is None else convert_ahead)
            check_apart({"output folder": output, "cache folder": config.resolved_cache_dir},
                        {"module folder": loaded.info.path})  # a URL's folder in the TF Hub cache
            if config.fine_tune:
                trainable_module_variables(loaded)  # a module that cannot be fine-tuned fails before any work
            if replicas is not None:
                replicas.load(loaded)
        except BaseException:
            if ahead is not None:
                ahead.close()
            raise
    spec = loaded.info.input_spec
    return Prepared(config, output, split, loaded, config.batch_for_images(spec.height, spec.width), replicas,
                    looked_up, ahead, backends[0] if backends else None)


def device_record(prep: Prepared) -> dict:
    """What run.json and the JSON say about the devices: replicas and the batches they ran."""
    count = 1 if prep.replicas is None else prep.replicas.count
    record = {"replicas": 1, "strategy": None} if prep.replicas is None else prep.replicas.record()
    record["extract_batch_size"] = prep.batch * count
    if prep.config.fine_tune:
        record["fine_tune_batch_size"] = prep.config.fine_tune_batch_size * count
    return record


# --- features: bottlenecks (and augmented copies) from the cache ------------------------------------


@dataclass
class Features:
    vectors: object  # content hash -> vector (vectors.VectorStore)
    cache: dict  # hits, misses, corrupt_shards, dir
    skipped: list[dict]
    folded: int  # validation images folded into training
    head_x: np.ndarray | StoredVectors  # training vectors, augmented copies after the originals (StoredVectors: streamed)
    head_y: np.ndarray
    groups: np.ndarray | None  # an image and its copies share a cross-validation fold
    augment: dict


def arrays(images, vectors, dim: int):
    x = np.stack([vectors[i.content_hash] for i in images]) if images else np.zeros((0, dim), np.float32)
    return x, np.asarray([i.label for i in images], np.int64)


def training_vectors(images, vectors, dim: int, stream: bool):
    """The head's training vectors and labels: an array, or with ``stream`` (more vectors than the
    head's memory budget, training/head.py) ``StoredVectors`` that read them from the run's vector
    store on disk a buffer at a time, so that no array of all of them is ever made."""
    if not stream:
        return arrays(images, vectors, dim)
    rows = vectors.rows_of([i.content_hash for i in images])
    return StoredVectors([(vectors, rows)]), np.asarray([i.label for i in images], np.int64)


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


def fold_validation(split, config: TrainConfig) -> int:
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


def compute_features(prep: Prepared, watch: Stopwatch) -> Features:
    config, split, loaded = prep.config, prep.split, prep.module
    with watch("bottlenecks"):
        cache_root = ensure_cache(config.resolved_cache_dir)
        clean_stale_temporaries(cache_root)
        cache = BottleneckCache(cache_root, loaded.info.fingerprint, loaded.info.input_spec.key())
        everything = split.train + split.validation + split.test
        extractor, batch = loaded, prep.batch
        if prep.replicas is None:
            # TensorFlow or LiteRT; without fine-tuning the export converts the module anyway (its float32 file)
            backend = prep.backend or ExtractionBackend(loaded, cache_root, config.extract_backend,
                                                        converted_anyway=not config.fine_tune)
        else:  # TensorFlow on every replica (distribute.py), each batch scaled by their number
            extractor, batch = prep.replicas.extractor, batch * prep.replicas.count
            backend = prep.replicas.backend(config.extract_backend)
        looked_up = prep.looked_up if prep.looked_up is not None and prep.looked_up.entry == cache.dir else None
        import_solver_ahead(config.head)
        bottlenecks = extract_bottlenecks(everything, extractor, cache, batch, backend=backend, looked_up=looked_up,
                                          ahead=prep.ahead)
    split.warnings.extend(backend.warnings)
    classes_by_path = {image.path: split.classes[image.label] for image in everything}
    skipped = list(split.skipped) + [
        {**item, "class": classes_by_path.get(item["path"]), "unusable": True} for item in bottlenecks.skipped
    ]
    for name in ("train", "validation", "test"):
        setattr(split, name, [i for i in getattr(split, name) if i.content_hash in bottlenecks.vectors])
    _check_unusable(split, skipped, config.max_unusable_fraction)
    folded = fold_validation(split, config)
    groups, augment = None, {}
    copies = config.resolved_augment_copies
    dim = loaded.info.feature_dim
    n_vectors = len(split.train) * (1 + (copies or 0))
    stream = choose_solver(config.head, n_vectors) == "minibatch" and should_stream(n_vectors, dim)
    head_x, head_y = training_vectors(split.train, bottlenecks.vectors, dim, stream)
    if config.augment:
        augment = {"settings": DEFAULT_AUGMENTATION.to_dict(), "copies": copies, "on_the_fly": config.fine_tune}
    if copies:  # training images only: validation and test stay as they are
        with watch("augment"):
            store = augmented_cache(cache_root, loaded.info, DEFAULT_AUGMENTATION)
            augmented, keys = extract_augmented_bottlenecks(split.train, extractor, store, copies, DEFAULT_AUGMENTATION,
                                                            batch)
        augment["cache"] = {"hits": augmented.hits, "misses": augmented.misses,
                            "corrupt_shards": len(augmented.corrupt_shards), "dir": str(store.dir)}
        copy_keys = [key for row in keys for key in row]
        n = len(head_y)
        groups = np.concatenate([np.arange(n), np.repeat(np.arange(n), copies)])
        if stream:
            head_x = StoredVectors(head_x.parts + [(augmented.vectors, augmented.vectors.rows_of(copy_keys))])
        else:
            head_x = np.concatenate([head_x, np.stack([augmented.vectors[key] for key in copy_keys])])
        head_y = np.concatenate([head_y, np.repeat(head_y, copies)])
    return Features(bottlenecks.vectors, {"hits": bottlenecks.hits, "misses": bottlenecks.misses,
                                          "corrupt_shards": len(bottlenecks.corrupt_shards), "dir": str(cache.dir),
                                          "backend": backend.record},
                    skipped, folded, head_x, head_y, groups, augment)


# --- head: the new layer on the cached vectors ------------------------------------------------------


@dataclass
class HeadStage:
    head: Head
    class_weights: dict | None
    class_balance: dict
    record: dict  # what run.json and the JSON say about the head
    metrics: dict  # cross_validation and/or validation
    label_errors: list[dict]


def train_head_stage(prep: Prepared, features: Features, watch: Stopwatch) -> HeadStage:
    config, split = prep.config, prep.split
    n_classes = len(split.classes)
    train_y = np.asarray([i.label for i in split.train], np.int64)
    counts = class_counts(train_y, n_classes)
    class_weights = balanced_class_weights(train_y, n_classes) if config.class_weight == "balanced" else None
    balance = {
        "class_counts": {name: int(count) for name, count in zip(split.classes, counts)},
        "imbalance_ratio": round(float(counts.max() / max(counts.min(), 1)), 3),
        "class_weight": config.class_weight,
        "class_weights": None if class_weights is None else {split.classes[c]: round(w, 4) for c, w in class_weights.items()},
    }
    val_x, val_y = arrays(split.validation, features.vectors, prep.module.info.feature_dim)
    with watch("train"):
        head = fit_head(features.head_x, features.head_y, val_x, val_y, n_classes, config, class_weights,
                        features.groups)
    metrics: dict = {}
    if len(val_x):
        metrics["validation"] = classification_metrics(val_y, head.probabilities(val_x).argmax(1), split.classes)
    cv = head.cross_validation
    if cv and cv.get("folds"):
        correct = int(round(cv["accuracy"] * cv["n_images"]))
        metrics["cross_validation"] = {"accuracy": cv["accuracy"], "n_images": cv["n_images"],
                                       "accuracy_interval": wilson_interval(correct, cv["n_images"]),
                                       "folds": cv["folds"], "c": cv["c"]}
    errors = [] if head.out_of_fold is None else find_label_errors(split.train, head.out_of_fold, split.classes)
    record = {**head.record(), "training_vectors": int(len(features.head_x)), "validation_folded": features.folded,
              "streamed": isinstance(features.head_x, StoredVectors)}
    return HeadStage(head, class_weights, balance, record, metrics, errors)


# --- fine-tune: the module's weights with the head (optional) ----------------------------------------


@dataclass
class Tuned:
    kernel: np.ndarray
    bias: np.ndarray
    weights_changed: bool
    module: dict  # the module record for run.json
    record: dict  # the fine-tuning record (empty without --fine-tune)


def fine_tune_stage(prep: Prepared, stage: HeadStage, metrics: dict, watch: Stopwatch) -> Tuned:
    """Without --fine-tune, the head as it is. Every bottleneck is computed and cached before:
    the cache never sees changed weights."""
    module_record = {**prep.module.info.to_dict(), "weights_changed": False}
    head = stage.head
    if not prep.config.fine_tune:
        return Tuned(head.kernel, head.bias, False, module_record, {})
    split = prep.split
    with watch("fine_tune"):
        fine = fine_tune(prep.module, head.kernel, head.bias, split.train, split.validation, len(split.classes),
                         prep.config, stage.class_weights, DEFAULT_AUGMENTATION if prep.config.augment else None,
                         replicas=prep.replicas)
    module_record.update(weights_changed=fine.weights_changed, weights_fingerprint=fine.weights_fingerprint)
    metrics["validation"] = classification_metrics(fine.validation_labels, fine.validation_probabilities.argmax(1),
                                                   split.classes)
    if not fine.weights_changed:
        split.warnings.append(
            f"fine-tuning did not improve validation in {fine.epochs_run} epoch(s) (frozen module: loss "
            f"{fine.frozen_validation['loss']:.4f}, accuracy {fine.frozen_validation['accuracy']:.4f}): "
            "the frozen module's weights were kept"
        )
    return Tuned(fine.kernel, fine.bias, fine.weights_changed, module_record, fine.to_dict())


# --- export: SavedModel, TFLite files (each checked), label-error page ------------------------------


def check_min_accuracy(bar: float | None, test: dict | None, output: Path) -> None:
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


def _test_reference(prep: Prepared, features: Features, tuned: Tuned, serving, decoded: Future,
                    metrics: dict) -> TestSet:
    """The test pixels and the probabilities every TFLite file must reproduce. Frozen module: the
    head on the test images' cached bottlenecks, which is what the saved graph computes and what
    training saw. Fine-tuned: the serving model in memory (the one just saved) on the pixels."""
    images, pixels, labels = decoded.result()
    test = TestSet(images, pixels, labels, None)
    if pixels is None:
        return test
    if tuned.weights_changed:
        test.reference = batched(serving.functions.serve_fixed, pixels, prep.batch)
        source = "fine-tuned serving model (the saved one, in memory) on the test images"
    else:
        test_x, _ = arrays(images, features.vectors, prep.module.info.feature_dim)
        test.reference = Head.probabilities_of(test_x, tuned.kernel, tuned.bias)
        source = "head on the test images' cached bottlenecks (what the SavedModel computes)"
    metrics["test"] = {**classification_metrics(labels, test.reference.argmax(1), prep.split.classes), "source": source}
    note = small_set_note(metrics["test"]["n_images"])
    if note:
        prep.split.warnings.append(note)
    return test


def write_labels(folder: Path, classes: list[str]) -> Path:
    path = folder / LABELS_FILE
    path.write_text("\n".join(classes) + "\n", encoding="utf-8")
    return path


def export_model(prep: Prepared, features: Features, stage: HeadStage, tuned: Tuned, decoded: Future,
                 metrics: dict, folder: Path, traced: Future | None = None) -> dict:
    """Write the model files into ``folder`` (the staging folder); returns the artifacts' final
    paths. ``traced``: the serving model built and traced while the bottlenecks were computed
    (``traced_serving_model``), used when the module's weights did not change."""
    config, split, output = prep.config, prep.split, prep.output
    labels_path = str(write_labels(folder, split.classes))
    if traced is not None and not tuned.weights_changed:
        serving = traced.result()
        serving.set_head(tuned.kernel, tuned.bias)
        serving.attach_labels(labels_path)
    else:
        serving = build_serving_model(prep.module, tuned.kernel, tuned.bias, labels_path)
    test = _test_reference(prep, features, tuned, serving, decoded, metrics)
    check_min_accuracy(config.min_accuracy, metrics.get("test"), output)
    formats = ["float32"] + [f for f in config.quantize if f != "float32"]
    representative = None
    if any(TFLITE_FORMATS[f].needs_representative for f in formats):
        representative = representative_images(split.train, prep.module.info.input_spec, config.calibration_samples,
                                               config.seed, prep.batch)
    float32, made = (None, MADE_BY_CONVERTER) if tuned.weights_changed else float32_from_module(
        prep.module, Path(features.cache["dir"]).parent, features.cache.get("backend") or {}, tuned.kernel, tuned.bias)
    paths = write_tflite_files(serving, folder, formats, split.classes, representative,
                               tflite_metadata(prep.module.info, split.classes, tuned.weights_changed), float32)
    # The files are checked on the test split while the SavedModel is saved.
    figures, warnings = check_tflite_files(paths, test, config.max_accuracy_drop,
                                           beside=lambda: save_serving_model(serving, folder / SAVED_MODEL_DIR))
    if "float32" in figures:
        figures["float32"]["made"] = made
    metrics["tflite"] = figures
    split.warnings.extend(warnings)
    artifacts = {"saved_model": str(output / SAVED_MODEL_DIR), "labels": str(output / LABELS_FILE)}
    if stage.label_errors:
        write_label_error_page(stage.label_errors, folder, split.classes)
        artifacts["label_errors"] = str(output / LABEL_ERRORS_PAGE)
    artifacts.update({f"tflite_{name}": str(output / path.name) for name, path in paths.items()})
    return artifacts


# --- the orchestrator --------------------------------------------------------------------------------


def train(image_dir: str | os.PathLike, module: str, output: str | os.PathLike, *, config: TrainConfig | None = None,
          overwrite: bool = False, **options) -> TrainResult:
    """Train a classifier on ``image_dir`` with ``module`` as a frozen feature extractor and
    write it to ``output``. Options are ``TrainConfig`` fields.

    With ``fine_tune``, a second stage then trains the module's weights too (training/finetune.py);
    with ``augment``, the head also learns from cached augmented copies of the training images."""
    config = replace(config, **options) if config is not None else TrainConfig.from_options(**options)
    watch = Stopwatch()
    prep = prepare(image_dir, module, output, config, overwrite, watch)
    # On a thread of its own: (frozen module) the serving model built and traced with a head to come,
    # while the bottlenecks are computed (LiteRT and the decoding let go of the GIL; beside the head's
    # solver, which holds it between its products, it made the head twice as slow); then the test
    # images decoded for the export checks, while the head trains.
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-ahead")
    traced = None if config.fine_tune else ahead.submit(traced_serving_model, prep.module, prep.split.classes)
    features = compute_features(prep, watch)
    decoded = ahead.submit(test_pixels, prep.split.test, prep.module.info.input_spec, prep.batch)
    ahead.shutdown(wait=False)
    stage = train_head_stage(prep, features, watch)
    metrics = dict(stage.metrics)
    tuned = fine_tune_stage(prep, stage, metrics, watch)
    with staged_output(output_target(prep.output), MODEL) as folder:
        with watch("export"):
            artifacts = export_model(prep, features, stage, tuned, decoded, metrics, folder, traced)
        artifacts.update(run=str(prep.output / RUN_FILE), model_card=str(prep.output / MODEL_CARD_FILE),
                         metrics=str(prep.output / METRICS_FILE))
        split = prep.split
        result = TrainResult(
            output=str(prep.output), classes=list(split.classes), split=split.counts(),
            split_per_class=split.counts_per_class(), metrics=metrics, timings=watch.rounded(),
            cache=features.cache, module=tuned.module, skipped=features.skipped, warnings=list(split.warnings),
            artifacts=artifacts, head=stage.record, label_errors=stage.label_errors,
            class_balance=stage.class_balance, augment=features.augment, fine_tune=tuned.record,
            devices=device_record(prep),
        )
        write_records(image_dir, result, config, folder)
    return result
