"""The Python API: ``train``, ``evaluate``, ``predict``, ``export``, ``export_module``. The CLI is a
thin layer over it.

The library never prints: it returns dataclasses, and progress goes through ``progress``.
``train`` is the pipeline of named stages in pipeline.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .data.dataset import split_dataset
from .errors import ConfigError, DatasetError, ModelError, OutputError
from .evaluation.card import model_card
from .evaluation.evaluate import Evaluation, Prediction, evaluate_runner, predict_runner
from .evaluation.runner import load_model, read_run_info
from .files import make_stage, remove_stage, write_atomic
from .pipeline import output_target, train
from .records import METRICS_FILE, MODEL_CARD_FILE, RUN_FILE, SAVED_MODEL_DIR, TrainResult
from .safety import MODEL, check_apart, written_by_tool
from .serving.checks import TestSet, representative_images, test_set, tflite_metadata, write_tflite_variants
from .serving.publish import ModuleExport, export_module
from .serving.tflite import TFLITE_FORMATS, tflite_format

__all__ = ["train", "evaluate", "predict", "export", "export_module", "TrainResult", "ModuleExport"]


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
    output = Path(output).expanduser()
    run = read_run_info(output)
    if not MODEL.owns(run):
        raise ModelError(f"{output} is not a retrain output folder: its {RUN_FILE} was not written by retrain")
    check_apart({"output folder": output}, {"representative folder": representative_dir})
    fmts = [tflite_format(f) for f in formats]
    if (representative_dir or calibration_samples) and not any(f.needs_representative for f in fmts):
        calibrated = ", ".join(f.export_name for f in TFLITE_FORMATS.values() if f.needs_representative)
        raise ConfigError(f"--representative and --calibration-samples calibrate {calibrated} only: "
                          f"{', '.join(f.export_name for f in fmts)} needs no calibration")
    for fmt in fmts:  # files of these names are replaced: only those retrain wrote
        final = output / fmt.filename
        if (final.exists() or final.is_symlink()) and not written_by_tool(fmt.filename, MODEL, run):
            raise OutputError(f"{final} was not written by retrain: move it out of {output} and export again")
    saved_model = output / SAVED_MODEL_DIR
    if not (saved_model / "saved_model.pb").exists():
        raise ModelError(f"{output} has no {SAVED_MODEL_DIR}/: not a retrain output folder")
    config, info = run["config"], _module_info(run)
    split = None
    if Path(run["image_dir"]).is_dir():
        split = split_dataset(run["image_dir"], config["validation_percent"], config["test_percent"],
                              config.get("validation_dir"), config.get("test_dir"))
    representative = None
    if any(f.needs_representative for f in fmts):
        representative = _calibration(run, split, representative_dir, calibration_samples, info.input_spec)
    test_images = split.test if split is not None else []
    test = test_set(saved_model, test_images, info.input_spec, 64) if test_images else TestSet([], None, None, None)
    threshold = config.get("max_accuracy_drop", 2.0) if max_accuracy_drop is None else max_accuracy_drop
    metrics_path = output / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    previous_float32 = metrics.get("tflite", {}).get("float32", {}).get("accuracy")
    scratch = make_stage(output_target(output))  # beside the folder: a killed run leaves nothing inside it
    try:
        paths, figures, warnings = write_tflite_variants(
            saved_model, scratch, [f.name for f in fmts], run["classes"], representative, test, threshold,
            tflite_metadata(info, run["classes"], run["module"].get("weights_changed", False)), previous_float32,
        )
        written = {}
        for name, path in paths.items():
            os.replace(path, output / path.name)
            written[name] = str(output / path.name)
    finally:
        remove_stage(scratch)
    if split is None:
        warnings.append(f"training folder {run['image_dir']} is gone: the new files were not checked on the test split")
    elif not test_images:
        warnings.append("the run has no test split: the new files were not checked")
    _update_records(output, run, metrics, figures, written)
    return {"artifacts": written, "tflite": figures, "warnings": warnings}


def _module_info(run: dict):
    """The module record of run.json as a ModuleInfo (the record has more: weights_changed...)."""
    from .features.module import InputSpec, ModuleInfo

    spec_data = run["module"]["input_spec"]
    spec = InputSpec(**{**spec_data, "value_range": tuple(spec_data["value_range"])})
    known = {f.name for f in dataclasses.fields(ModuleInfo)}
    return ModuleInfo(**{**{k: v for k, v in run["module"].items() if k in known}, "input_spec": spec})


def _calibration(run: dict, split, representative_dir, samples: int | None, spec) -> list:
    """int8 calibration images: from --representative, else the training split (as in training:
    calibration never sees test images), else the image folder when its split is gone."""
    from .data.dataset import scan_folder

    config = run["config"]
    if representative_dir or split is None:
        scan = scan_folder(representative_dir or run["image_dir"], classes=run["classes"], role="representative folder")
        if not scan.images:
            raise DatasetError(f"representative folder {scan.root} has no usable images")
        candidates = scan.images
    else:
        candidates = split.train
    return representative_images(candidates, spec, samples or config.get("calibration_samples", 200),
                                 config.get("seed", 0), 64)


def _update_records(output: Path, run: dict, metrics: dict, figures: dict, written: dict) -> None:
    """run.json's file list, metrics.json's TFLite table and the model card, each written atomically."""
    if isinstance(run.get("files"), list):
        run["files"] = sorted(set(run["files"]) | {Path(p).name for p in written.values()})
        write_atomic(output / RUN_FILE, json.dumps(run, indent=2) + "\n")
    metrics.setdefault("tflite", {}).update(figures)
    write_atomic(output / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    write_atomic(output / MODEL_CARD_FILE, model_card(run, metrics))
