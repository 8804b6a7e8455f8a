"""Run a trained model, whatever form it has: an output folder, a SavedModel, a .tflite file.

One code path per form, used by the export checks, ``evaluate`` and ``predict``. Every runner
takes uint8 images already resized to its ``height`` x ``width`` (see images.iter_image_batches)
and returns float probabilities ``[batch, classes]``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

from .._tf import quiet_stderr
from .._tf import tf as _tf
from ..errors import ModelError, first_line
from ..features.audit import audit_module
from ..serving.tflite import (
    LABELS_FILE,
    OUTPUT_KEY,
    SIGNATURE_ANY_SIZE,
    SIGNATURE_FIXED,
    read_labels,
    read_tflite_labels,
)


def _accepted_ops(saved_model: Path) -> tuple[str, ...]:
    """The ops a retrain run accepted in its module (``--allow-module-op``), from the run.json beside."""
    try:
        run = json.loads((saved_model.parent / "run.json").read_text(encoding="utf-8"))
        ops = run.get("config", {}).get("allowed_module_ops", [])
    except (OSError, ValueError, AttributeError):
        return ()
    return tuple(op for op in ops if isinstance(op, str)) if isinstance(ops, list) else ()


class SavedModelRunner:
    kind = "saved_model"
    uses_tensorflow = True  # its images are decoded and resized by TensorFlow as well

    def __init__(self, directory: str | Path):
        tf = _tf()
        self.path = str(directory)
        audit_module(directory, allowed_ops=_accepted_ops(Path(directory)), what="model")  # before any of it runs
        try:
            self._loaded = tf.saved_model.load(self.path)
        except Exception as error:
            first = first_line(error)
            raise ModelError(f"cannot load SavedModel {directory}: {first}") from None
        signatures = self._loaded.signatures
        if SIGNATURE_ANY_SIZE not in signatures:
            raise ModelError(f"SavedModel {directory} has no {SIGNATURE_ANY_SIZE!r} signature")
        self._serve = signatures[SIGNATURE_ANY_SIZE]
        fixed = signatures.get(SIGNATURE_FIXED)
        if fixed is None:
            raise ModelError(f"SavedModel {directory} was not written by retrain (no {SIGNATURE_FIXED!r} signature)")
        shape = fixed.structured_input_signature[1]["images"].shape
        self.height, self.width = int(shape[1]), int(shape[2])
        labels = Path(directory) / "assets" / LABELS_FILE
        if not labels.exists():
            labels = Path(directory).parent / LABELS_FILE
        if not labels.exists():
            raise ModelError(f"no {LABELS_FILE} in {Path(directory) / 'assets'} or beside {directory}")
        self.classes = read_labels(labels)

    def predict(self, images: np.ndarray) -> np.ndarray:
        tf = _tf()
        return self._serve(images=tf.constant(images, tf.uint8))[OUTPUT_KEY].numpy()


# Images per invoke. On 2 CPU cores with MobileNetV2 0.35, 215 images took 0.19 s as invokes of
# 4-8 images, 0.29 s of 32 and 0.65 s as one invoke of 215 (large batches leave the caches).
INVOKE_BATCH = 8


def _tflite_interpreter():
    """LiteRT's Interpreter. Where LiteRT is missing, TensorFlow's copy (identical outputs) only
    when TensorFlow is loaded already (the export checks): ``predict`` and ``evaluate`` on a
    .tflite file never import TensorFlow, which costs more than everything else they do."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        if "tensorflow" in sys.modules:
            return _tf().lite.Interpreter
        raise ModelError("running a .tflite file needs the LiteRT interpreter: pip install ai-edge-litert") from None
    return Interpreter


class TFLiteRunner:
    kind = "tflite"
    uses_tensorflow = False  # images decoded and resized by NumPy code that gives TensorFlow's pixels

    def __init__(self, path: str | Path, num_threads: int | None = None):
        self.path = str(path)
        Interpreter = _tflite_interpreter()
        if importlib.util.find_spec("simplejpeg") is None:
            raise ModelError("decoding images for a .tflite file needs the simplejpeg package: pip install simplejpeg")
        try:
            with quiet_stderr():  # LiteRT logs the XNNPACK delegate's creation on stderr
                self.interpreter = Interpreter(model_path=self.path, num_threads=num_threads or os.cpu_count())
                self.interpreter.allocate_tensors()
        except Exception as error:
            first = first_line(error)
            raise ModelError(f"cannot load TFLite model {path}: {first}") from None
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        shape = self._input["shape"]
        if len(shape) != 4 or shape[3] != 3:
            raise ModelError(f"TFLite model {path} takes input {list(shape)}, not images [1, H, W, 3]")
        self.height, self.width = int(shape[1]), int(shape[2])
        self.input_dtype = self._input["dtype"]
        self._batch = int(shape[0])
        self._flexible_batch = int(self._input.get("shape_signature", shape)[0]) == -1
        labels = read_tflite_labels(path)
        if labels is None:
            beside = Path(path).parent / LABELS_FILE
            if not beside.exists():
                raise ModelError(f"TFLite model {path} carries no labels and there is no {LABELS_FILE} beside it")
            labels = read_labels(beside)
        self.classes = labels

    def _resize(self, batch: int) -> None:
        self.interpreter.resize_tensor_input(self._input["index"], [batch, self.height, self.width, 3])
        self.interpreter.allocate_tensors()
        self._batch = batch

    def _run(self, images: np.ndarray) -> np.ndarray:
        if len(images) != self._batch:
            self._resize(len(images))
        self.interpreter.set_tensor(self._input["index"], images.astype(self.input_dtype, copy=False))
        self.interpreter.invoke()
        output = self.interpreter.get_tensor(self._output["index"])
        scale, zero_point = self._output.get("quantization", (0.0, 0))
        if output.dtype != np.float32 and scale:
            output = (output.astype(np.float32) - zero_point) * scale
        return output.astype(np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.uint8)
        step = INVOKE_BATCH if self._flexible_batch else 1
        return np.concatenate([self._run(images[i : i + step]) for i in range(0, len(images), step)])


def load_model(path: str | os.PathLike):
    """An output folder, a SavedModel folder or a .tflite file -> a runner."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"model {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".tflite":
            raise ModelError(f"model {path} is a file but not a .tflite file")
        return TFLiteRunner(path)
    if (path / "saved_model.pb").exists():
        return SavedModelRunner(path)
    if (path / "saved_model" / "saved_model.pb").exists():
        return SavedModelRunner(path / "saved_model")
    raise ModelError(f"model {path} is neither a retrain output folder, a SavedModel nor a .tflite file")


def read_run_info(output_dir: str | os.PathLike) -> dict:
    run_json = Path(output_dir) / "run.json"
    try:
        return json.loads(run_json.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {run_json}: {error}") from None
