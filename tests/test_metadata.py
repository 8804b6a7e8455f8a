"""TFLite metadata (labels for on-device tooling) written by retrain.serving.metadata, read back without MediaPipe."""

import io
import zipfile

import numpy as np
import pytest

from retrain.serving.metadata import METADATA_NAME, add_metadata
from retrain.serving.metadata_reader import read_metadata

LABELS = ["blue", "green", "red"]
SIZE = 16
COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}
INFO = dict(
    height=SIZE,
    width=SIZE,
    name="colours",
    description="Tells blue, green and red apart.",
    version="v1",
    input_description="Input image to be classified.",
    output_description="Probabilities of the labels respectively.",
)


@pytest.fixture(scope="module")
def plain_models(tmp_path_factory):
    """float32 and full-integer flatbuffers of a tiny colour classifier: uint8 [1, 16, 16, 3] -> [1, 3]."""
    import tensorflow as tf

    class Colours(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(np.eye(3, dtype=np.float32) * 8.0 - 2.0)
            self.bias = tf.Variable(np.zeros(3, np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.uint8, name="image")])
        def serve(self, image):
            mean = tf.reduce_mean(tf.cast(image, tf.float32) / 255.0, axis=[1, 2])
            rgb_to_bgr = tf.reverse(tf.nn.relu(tf.matmul(mean, self.kernel) + self.bias), axis=[1])
            return {"probabilities": tf.nn.softmax(rgb_to_bgr)}

    module = Colours()
    path = str(tmp_path_factory.mktemp("metadata") / "colours")
    tf.saved_model.save(module, path, signatures={"serving_fixed": module.serve})

    float32 = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=["serving_fixed"]).convert()

    converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=["serving_fixed"])
    rng = np.random.default_rng(0)

    def representative():
        for colour in list(COLOURS.values()) * 4:
            noisy = np.asarray(colour) + rng.normal(scale=20, size=(1, SIZE, SIZE, 3))
            yield [np.clip(noisy, 0, 255).astype(np.uint8)]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    int8 = converter.convert()
    return {"float32": float32, "int8": int8}


def _run(model_bytes):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(model_bytes))
    interpreter.allocate_tensors()
    given, taken = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for colour in COLOURS.values():
        interpreter.set_tensor(given["index"], np.full((1, SIZE, SIZE, 3), colour, np.uint8))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(taken["index"]).copy())
    return np.concatenate(outputs), interpreter.get_signature_list()


@pytest.mark.parametrize("variant", ["float32", "int8"])
def test_metadata_round_trip(plain_models, variant, tmp_path):
    plain = plain_models[variant]
    written = add_metadata(plain, LABELS, **INFO)

    path = tmp_path / "model.tflite"
    path.write_bytes(written)
    for source in (written, path, str(path)):
        meta = read_metadata(source)
        assert meta["labels"] == LABELS
    assert meta["name"] == "colours"
    assert meta["description"] == INFO["description"]
    assert meta["version"] == "v1"
    assert meta["min_parser_version"] == "1.0.0"
    assert meta["input"]["name"] == "image"
    assert meta["input"]["description"] == INFO["input_description"]
    assert meta["input"]["color_space"] == "RGB"
    assert (meta["input"]["width"], meta["input"]["height"]) == (SIZE, SIZE)
    assert meta["input"]["stats"] == {"max": [255.0], "min": [0.0]}  # uint8 image: no normalization
    assert meta["output"]["name"] == "probability"
    assert meta["output"]["description"] == INFO["output_description"]
    assert meta["output"]["associated_files"] == [{"name": "labels.txt", "type": "TENSOR_AXIS_LABELS"}]
    assert meta["output"]["stats"]["max"] == ([1.0] if variant == "float32" else [255.0])

    with zipfile.ZipFile(io.BytesIO(written)) as archive:
        assert archive.namelist() == ["labels.txt"]
        assert archive.read("labels.txt").decode() == "blue\ngreen\nred\n"

    expected, expected_signatures = _run(plain)
    got, signatures = _run(written)
    assert got.dtype == (np.float32 if variant == "float32" else np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert signatures == expected_signatures
    assert [LABELS[i] for i in got.argmax(axis=1)] == list(COLOURS)


def test_metadata_is_a_model_buffer_named_tflite_metadata(plain_models):
    from ai_edge_litert import schema_py_generated as schema

    plain = plain_models["float32"]
    written = add_metadata(plain, LABELS, **INFO)
    before, after = schema.Model.GetRootAs(plain, 0), schema.Model.GetRootAs(written, 0)
    names = [after.Metadata(i).Name().decode() for i in range(after.MetadataLength())]
    old_names = [before.Metadata(i).Name().decode() for i in range(before.MetadataLength())]
    assert names == old_names + [METADATA_NAME]  # the converter's own entries are kept
    entry = after.Metadata(names.index(METADATA_NAME))
    buffer = after.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    assert buffer[4:8] == b"M001"  # ModelMetadata's file identifier
    assert after.BuffersLength() == before.BuffersLength() + 1
    for index in range(after.BuffersLength()):  # buffers keep schema.fbs's 16-byte alignment
        table = after.Buffers(index)._tab
        if after.Buffers(index).DataLength():
            assert table.Vector(table.Offset(4)) % 16 == 0


def test_no_metadata_reads_none(plain_models, tmp_path):
    plain = plain_models["float32"]
    assert read_metadata(plain) is None
    bare = tmp_path / "bare.tflite"  # labels.txt zip-appended without metadata (the old layout)
    bare.write_bytes(plain)
    with zipfile.ZipFile(bare, "a") as archive:
        archive.writestr("labels.txt", "blue\ngreen\nred\n")
    assert read_metadata(bare) is None
    assert read_metadata(b"not a model at all") is None


def test_adding_twice_replaces_metadata_and_labels(plain_models):
    once = add_metadata(plain_models["int8"], LABELS, **INFO)
    twice = add_metadata(once, ["azure", "lime", "crimson"], **{**INFO, "version": "v2"})
    meta = read_metadata(twice)
    assert meta["labels"] == ["azure", "lime", "crimson"]
    assert meta["version"] == "v2"
    with zipfile.ZipFile(io.BytesIO(twice)) as archive:
        assert archive.namelist() == ["labels.txt"]
    np.testing.assert_array_equal(_run(twice)[0], _run(plain_models["int8"])[0])


def test_label_count_must_match_the_output(plain_models):
    with pytest.raises(ValueError, match="3 classes but 2 labels"):
        add_metadata(plain_models["float32"], ["blue", "green"], **INFO)
    with pytest.raises(ValueError, match="one line"):
        add_metadata(plain_models["float32"], ["blue", "gre\nen", "red"], **INFO)


def test_without_ai_edge_litert_add_metadata_raises_import_error(plain_models, monkeypatch):
    import sys

    for name in ("ai_edge_litert", "ai_edge_litert.schema_py_generated"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="ai-edge-litert"):
        add_metadata(plain_models["float32"], LABELS, **INFO)
    assert read_metadata(plain_models["float32"]) is None  # reading needs only flatbuffers
