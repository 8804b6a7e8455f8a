"""The serving model and its files: SavedModel, TFLite variants (one table), labels.

The serving model takes uint8 RGB images and does everything training did: bilinear resize to
the module's size, rounding to uint8, scaling to the module's range, the module, the head,
softmax. Its SavedModel has two signatures:

* ``serving_default``: ``images`` uint8 ``[batch, any height, any width, 3]`` -> ``probabilities``;
* ``serving_fixed``: ``images`` uint8 ``[batch, H, W, 3]`` (already resized with the same
  bilinear resize) -> ``probabilities``; TFLite files are converted from this one, since a
  TFLite graph with an unknown image size converts to a ``[1, 1, 1, 3]`` input;
* ``serving_bytes``: ``image_bytes`` string ``[batch]`` (encoded JPEG, PNG, GIF or BMP files, as
  TF Serving and Vertex AI send them) -> ``probabilities``, ``classes`` (the top class names,
  best first) and ``scores`` (their probabilities), decoded as training decodes (data/encoded.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .._tf import quiet_stderr
from .._tf import tf as _tf
from ..errors import ConfigError, ModelError
from ..data.encoded import decode_encoded_batch
from ..data.images import resize_to_uint8, to_module_input

SIGNATURE_ANY_SIZE = "serving_default"
SIGNATURE_FIXED = "serving_fixed"
SIGNATURE_BYTES = "serving_bytes"
SIGNATURES = (SIGNATURE_ANY_SIZE, SIGNATURE_FIXED, SIGNATURE_BYTES)
OUTPUT_KEY = "probabilities"
BYTES_INPUT = "image_bytes"
TOP_CLASSES = 5  # class names serving_bytes returns per image (fewer when there are fewer classes)
LABELS_FILE = "labels.txt"


def build_serving_model(module, kernel: np.ndarray, bias: np.ndarray, labels_path: str):
    """A ``tf.Module`` (not a Keras model: TFLite conversion of Keras 3 models wrapping a
    SavedModel gave wrong outputs) with the three serving functions (see the module doc)."""
    serving = _serving_model(module, kernel, bias, read_labels(labels_path))
    serving.attach_labels(labels_path)
    return serving


def _serving_model(module, kernel: np.ndarray, bias: np.ndarray, classes: list[str]):
    """The serving model without its labels file (``attach_labels`` adds it, before the save)."""
    tf = _tf()
    spec = module.info.input_spec

    class ServingModel(tf.Module):
        def __init__(self):
            super().__init__(name="retrain_classifier")
            self.head_kernel = tf.Variable(kernel, trainable=False, name="head_kernel")
            self.head_bias = tf.Variable(bias, trainable=False, name="head_bias")
            self.class_names = tf.constant(list(classes))
            # The functions are the SavedModel's signatures, and only that: held in a plain
            # namespace, which the SavedModel writer does not walk. As attributes it would save
            # each a second time, traced again under its save context (1-1.5 s of every export).
            self.functions = SimpleNamespace(
                serve=tf.function(self._serve, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                                              name="images")], autograph=False),
                serve_fixed=tf.function(self._probabilities, input_signature=[
                    tf.TensorSpec([None, spec.height, spec.width, 3], tf.uint8, name="images")], autograph=False),
                serve_bytes=tf.function(self._serve_bytes, input_signature=[tf.TensorSpec([None], tf.string,
                                                                                          name=BYTES_INPUT)],
                                        autograph=False),
            )
            # Track the variables the serving graph uses, not the module object: the object would
            # bring every function it was saved with (training variants too) into the SavedModel,
            # which made saving, loading and TFLite conversion about three times slower.
            # The module's own list first (its order is what weights fingerprints use), then any
            # other variable the graph captures.
            listed = list(getattr(module.obj, "variables", None) or [])
            known = {id(v) for v in listed} | {id(self.head_kernel), id(self.head_bias)}
            captured = self.functions.serve_fixed.get_concrete_function().variables
            self.module_variables = listed + [v for v in captured if id(v) not in known]

        def _probabilities(self, images):
            features = module.features(to_module_input(images, spec.value_range))
            logits = tf.matmul(features, self.head_kernel) + self.head_bias
            return {OUTPUT_KEY: tf.nn.softmax(logits)}

        def _serve(self, images):
            return self._probabilities(resize_to_uint8(images, spec.height, spec.width))

        def _serve_bytes(self, image_bytes):
            probabilities = self._probabilities(decode_encoded_batch(image_bytes, spec.height, spec.width))[OUTPUT_KEY]
            top = tf.math.top_k(probabilities, k=min(TOP_CLASSES, len(kernel[0])))
            return {OUTPUT_KEY: probabilities, "classes": tf.gather(self.class_names, top.indices), "scores": top.values}

        def set_head(self, kernel: np.ndarray, bias: np.ndarray) -> None:
            """The trained head, into the head variables (their shapes are the model's)."""
            for variable, value in ((self.head_kernel, kernel), (self.head_bias, bias)):
                if tuple(np.shape(value)) != tuple(variable.shape):
                    raise ModelError(f"a head of shape {np.shape(value)} for the serving model's {variable.shape}")
                variable.assign(np.asarray(value, np.float32))

        def attach_labels(self, path: str) -> None:
            """The labels file the SavedModel holds as an asset: the classes the model was built with."""
            if read_labels(path) != list(classes):
                raise ModelError(f"labels file {path} does not list the serving model's classes")
            self.labels = tf.saved_model.Asset(path)

    return ServingModel()


def traced_serving_model(module, classes: list[str]):
    """The serving model of ``module`` with a head of zeros and its functions traced, built while
    the bottlenecks are computed (``train``): once the head is trained, ``set_head`` puts it in and
    ``attach_labels`` adds the labels file, and the model is what ``build_serving_model`` with that
    head gives, its saved files the same. Measured on MobileNetV2 0.35, alone: 0.1-0.3 s to build
    and 0.9 s to trace, taken off the export."""
    zeros = np.zeros((module.info.feature_dim, len(classes)), np.float32), np.zeros(len(classes), np.float32)
    serving = _serving_model(module, *zeros, classes)
    for function in vars(serving.functions).values():  # traced now, as saving would
        function.get_concrete_function()
    return serving


def read_labels(path) -> list[str]:
    """The class names of a labels.txt, one per non-empty line."""
    labels = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not labels:
        raise ModelError(f"labels file {path} is empty")
    return labels


def save_serving_model(serving, directory: str | Path) -> None:
    """Save, then read back what the files hold: both signatures, and every variable equal to the
    serving model's (the TFLite files are converted from the model in memory, so this is what
    ties the SavedModel to the checked files; reading the checkpoint takes a fraction of the
    second a full load does)."""
    tf = _tf()
    directory = Path(directory)
    if getattr(serving, "labels", None) is None:
        raise ModelError("the serving model has no labels file attached (attach_labels)")
    tf.saved_model.save(
        serving,
        str(directory),
        signatures={SIGNATURE_ANY_SIZE: serving.functions.serve.get_concrete_function(),
                    SIGNATURE_FIXED: serving.functions.serve_fixed.get_concrete_function(),
                    SIGNATURE_BYTES: serving.functions.serve_bytes.get_concrete_function()},
    )
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((directory / "saved_model.pb").read_bytes())
    missing = set(SIGNATURES) - set(proto.meta_graphs[0].signature_def)
    if missing:
        raise ModelError(f"the SavedModel written to {directory} lacks signature(s) {', '.join(sorted(missing))}")
    reader = tf.train.load_checkpoint(str(directory / "variables" / "variables"))
    expected = {"head_kernel": serving.head_kernel, "head_bias": serving.head_bias,
                **{f"module_variables/{i}": v for i, v in enumerate(serving.module_variables)}}
    for path, variable in expected.items():
        key = f"{path}/.ATTRIBUTES/VARIABLE_VALUE"
        if not reader.has_tensor(key) or not np.array_equal(reader.get_tensor(key), variable.numpy()):
            raise ModelError(f"the SavedModel written to {directory} does not hold the trained value of {path}")


# --- TFLite formats: one table -------------------------------------------------------------


def _float32(converter, representative):
    pass


def _dynamic(converter, representative):
    converter.optimizations = [_tf().lite.Optimize.DEFAULT]


def _float16(converter, representative):
    tf = _tf()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


def _int8(converter, representative):
    tf = _tf()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8


def _compact(flatbuffer: bytes) -> bytes:
    from .mixed import quantize_compact

    return quantize_compact(flatbuffer)[0]


@dataclass(frozen=True)
class TFLiteFormat:
    name: str
    filename: str
    description: str
    configure: Callable
    needs_representative: bool = False
    agreement_tolerance: float = 0.995  # minimum top-1 agreement with the SavedModel expected
    # applied to the converted flatbuffer (``configure`` then only sets the conversion up)
    postprocess: Callable[[bytes], bytes] | None = None

    @property
    def export_name(self) -> str:
        """The name ``retrain export --format`` takes: ``tflite``, ``tflite-int8``..."""
        return "tflite" if self.name == "float32" else f"tflite-{self.name}"


TFLITE_FORMATS = {
    f.name: f
    for f in (
        TFLiteFormat("float32", "model.tflite", "float32 weights and activations", _float32),
        TFLiteFormat("int8", "model_int8.tflite", "int8 weights in the late layers, float16 in the early ones, "
                     "float compute (serving/mixed.py)", _float32, agreement_tolerance=0.95, postprocess=_compact),
        TFLiteFormat("dynamic", "model_dynamic.tflite", "int8 weights, float activations (dynamic range)", _dynamic, agreement_tolerance=0.98),
        TFLiteFormat("float16", "model_float16.tflite", "float16 weights", _float16, agreement_tolerance=0.99),
        TFLiteFormat("int8-full", "model_int8_full.tflite", "full integer: uint8 input and output, int8 inside "
                     "(integer-only accelerators)", _int8, True, agreement_tolerance=0.95),
    )
}


def tflite_format(name: str) -> TFLiteFormat:
    if name not in TFLITE_FORMATS:
        import difflib

        close = difflib.get_close_matches(name, list(TFLITE_FORMATS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown TFLite format {name!r}{hint}; formats: {', '.join(TFLITE_FORMATS)}")
    return TFLITE_FORMATS[name]


def tflite_converter(source):
    """A converter for the ``serving_fixed`` function, reused for every variant (``export_tflite``
    resets it to the defaults before configuring each format).

    ``source`` is the serving model in memory (``train``) or a SavedModel folder (``export``).
    From memory, the function is frozen and converted directly: converting from a SavedModel
    loads it twice (once for the signatures, once more inside ``convert`` for debug
    information), which cost 0.7 + 0.8 s of a 3 s conversion. The frozen path writes no
    SignatureDef, so ``export_tflite`` adds the one the SavedModel path writes."""
    tf = _tf()
    if isinstance(source, (str, Path)):
        return tf.lite.TFLiteConverter.from_saved_model(str(source), signature_keys=[SIGNATURE_FIXED])
    from .._converter import from_concrete_function

    return from_concrete_function(source.functions.serve_fixed.get_concrete_function(), source)


def _reset(converter) -> None:
    tf = _tf()
    converter.optimizations = set()
    converter.representative_dataset = None
    converter.target_spec = tf.lite.TargetSpec()
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32


def export_tflite(
    source,
    destination: str | Path,
    format_name: str,
    labels: list[str],
    representative: Iterable[np.ndarray] | None,
    metadata: dict,
    converter=None,
    converted: dict | None = None,
) -> Path:
    """Convert the ``serving_fixed`` function of ``source`` (see ``tflite_converter``) to one TFLite
    variant, with its labels inside: TFLite metadata (read by on-device tooling) plus labels.txt
    as a packed associated file, and the ``serving_fixed`` SignatureDef (``images`` ->
    ``probabilities``). ``converter``: one from ``tflite_converter(source)``, to reuse across variants;
    ``converted``: a dict shared across variants, holding the float32 conversion that the variants
    quantized after conversion (``postprocess``) start from."""
    fmt = tflite_format(format_name)
    if fmt.needs_representative and representative is None:
        raise ConfigError(f"TFLite format {fmt.name} needs representative images")
    if converter is None:
        converter = tflite_converter(source)
    _reset(converter)

    def representative_dataset():
        for image in representative:
            yield [np.asarray(image, np.uint8)[None]]

    fmt.configure(converter, representative_dataset)
    if fmt.configure is _float32 and converted is not None and "float32" in converted:
        flatbuffer = converted["float32"]  # the same conversion: done once per export
    else:
        with quiet_stderr(), warnings.catch_warnings():  # the calibrator prints its settings on stderr
            # The frozen-graph path asks for uint8 input statistics that post-training quantization
            # takes from calibration instead: the input's quantization is the same as from a SavedModel.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            flatbuffer = converter.convert()
        if fmt.configure is _float32 and converted is not None:
            converted["float32"] = flatbuffer
    if fmt.postprocess is not None:
        with quiet_stderr():
            flatbuffer = fmt.postprocess(flatbuffer)
    from .metadata import add_metadata

    flatbuffer = add_metadata(flatbuffer, labels, signature=(SIGNATURE_FIXED, "images", OUTPUT_KEY),
                              **metadata)  # packs labels.txt too
    destination = Path(destination)
    destination.write_bytes(flatbuffer)
    return destination


def read_tflite_labels(tflite_path: str | Path) -> list[str] | None:
    """The labels packed inside a .tflite file, or None."""
    from .metadata_reader import read_zip_labels

    return read_zip_labels(Path(tflite_path).read_bytes(), LABELS_FILE)
