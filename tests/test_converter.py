"""The TFLite converter frozen without rebuilding a function (retrain/_converter.py) writes the
flatbuffer TensorFlow's own ``from_concrete_functions`` writes, byte for byte, for the module's
conversion and for every serving variant, and takes its short way only where it applies."""

import numpy as np
import pytest

from retrain import _converter
from retrain.features import lite
from retrain.features.module import load_module
from retrain.serving import tflite


def _reference(concrete, trackable):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], trackable)
    converter.experimental_lower_to_saved_model = False
    return converter


def _frozen_the_long_way(monkeypatch):
    """Count the converter's own freezing (the one that rebuilds a function)."""
    import tensorflow as tf

    calls = []
    original = tf.lite.TFLiteConverter._freeze_concrete_function

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(tf.lite.TFLiteConverter, "_freeze_concrete_function", counted)
    return calls


def test_the_module_s_conversion_is_the_converter_s_byte_for_byte(tiny_module, monkeypatch):
    module = load_module(tiny_module)
    concrete = module.pixel_features.get_concrete_function()
    expected = _reference(concrete, module.obj).convert()
    long_way = _frozen_the_long_way(monkeypatch)
    got = lite.convert_module(module)
    assert long_way == [] and got == expected


def test_every_serving_variant_is_the_converter_s_byte_for_byte(tiny_module, tmp_path, monkeypatch):
    module = load_module(tiny_module)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(module.info.feature_dim, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    serving = tflite.build_serving_model(module, kernel, bias, str(tmp_path / "labels.txt"))
    concrete = serving.functions.serve_fixed.get_concrete_function()
    pixels = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)

    def representative():
        for image in pixels:
            yield [image[None]]

    def converted(converter, fmt):
        fmt.configure(converter, representative)
        return converter.convert()

    formats = list(tflite.TFLITE_FORMATS.values())
    assert {f.configure for f in formats} >= {tflite._float32, tflite._dynamic, tflite._float16, tflite._int8}
    expected = [converted(_reference(concrete, serving), fmt) for fmt in formats]
    long_way = _frozen_the_long_way(monkeypatch)
    got = [converted(tflite.tflite_converter(serving), fmt) for fmt in formats]
    assert long_way == []
    for fmt, a, b in zip(formats, got, expected):
        assert a == b, fmt.name


def test_options_that_run_grappler_freeze_the_converter_s_own_way(tiny_module, monkeypatch):
    """Grappler passes read the frozen function's graph: with TF Select ops alone (the layout
    pass), the converter's own freezing runs. (Such files differ from one conversion to the next
    even from the converter alone, in the serialized TF ops: their sizes are compared.)"""
    import tensorflow as tf

    module = load_module(tiny_module)
    concrete = module.pixel_features.get_concrete_function()
    reference = _reference(concrete, module.obj)
    reference.target_spec.supported_ops = [tf.lite.OpsSet.SELECT_TF_OPS]
    expected = reference.convert()
    long_way = _frozen_the_long_way(monkeypatch)
    converter = _converter.from_concrete_function(concrete, module.obj)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.SELECT_TF_OPS]
    assert len(converter.convert()) == len(expected) and long_way == [1]


@pytest.mark.realdata
def test_the_real_module_s_conversion_is_the_converter_s_byte_for_byte(real_data):
    module = load_module(str(real_data / "modules" / "mobilenet_v2_035_224"))
    concrete = module.pixel_features.get_concrete_function()
    assert lite.convert_module(module) == _reference(concrete, module.obj).convert()
