"""What a default run no longer pays for, each checked to change nothing it gives:

- TensorFlow's import without Keras (imported when something needs it);
- the images to compute decoded while the module loads (features/ahead.py): the same batches;
- the float32 file made from the module's LiteRT conversion and the head (serving/compose.py):
  the converter's probabilities, and the fine-tuned path still converts the serving graph;
- the SavedModel saved with its three signatures only, each traced once.
"""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

import retrain
from retrain import pipeline
from retrain.data.dataset import scan_folder
from retrain.data.images import iter_image_batches
from retrain.features import ahead as ahead_module
from retrain.features.ahead import DecodedAhead
from retrain.serving import compose
from retrain.serving.compose import MADE_BY_CONVERTER, MADE_FROM_MODULE, append_head

FAST = dict(epochs=3, cv_folds=2)


def test_tensorflow_is_imported_without_keras_and_keras_still_imports():
    code = (
        "import sys\n"
        "from retrain._tf import tf, keras_registrations\n"
        "tf()\n"
        "print('keras' in sys.modules, 'keras.src.optimizers' in sys.modules)\n"
        "keras_registrations()\n"
        "import keras\n"
        "print('keras.src.optimizers' in sys.modules, keras.optimizers.Adam.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split() == ["False", "False", "True", "Adam"]


def _batches(images, **kwargs):
    return list(iter_image_batches([i.path for i in images], [i.decoder for i in images], 16, 16, 4, **kwargs))


def _same(got, expected):
    assert len(got) == len(expected)
    for (gi, gp, gs), (ei, ep, es) in zip(got, expected):
        assert np.array_equal(gi, ei) and gs == es
        assert (gp is None and ep is None) or np.array_equal(np.asarray(gp), np.asarray(ep))


def test_decoded_ahead_gives_extraction_s_batches_within_its_budget(colour_dir, tmp_path):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(colour_dir, folder)
    (folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # skipped with a reason
    images = scan_folder(folder).images
    expected = _batches(images)
    assert any(skipped for _, _, skipped in expected)
    one_batch = 4 * 16 * 16 * 3
    held = DecodedAhead(images, 16, 16, 4, budget_bytes=one_batch)  # at most one batch waits
    waited = threading.Event()
    while held._thread.is_alive() and not waited.is_set():
        with held._ready:
            if held._held and held._bytes >= one_batch:
                waited.set()
        waited.wait(0.01)
    assert waited.is_set() and held._bytes <= one_batch
    assert held.matches(images, 16, 16, 4) and not held.matches(images, 16, 16, 8)
    _same(list(held), expected)
    assert not held.matches(images, 16, 16, 4)  # taken: used once
    held.close()
    assert not held._thread.is_alive()


def test_closing_it_stops_the_decoding_and_an_error_reaches_the_consumer(colour_dir, monkeypatch):
    images = scan_folder(colour_dir).images
    stopped = DecodedAhead(images, 16, 16, 2, budget_bytes=1)
    stopped.close()
    assert not stopped._thread.is_alive() and not stopped._held

    def failing(*args, **kwargs):
        yield from []
        raise OSError("disk gone")

    monkeypatch.setattr(ahead_module, "iter_image_batches", failing)
    with pytest.raises(OSError, match="disk gone"):
        list(DecodedAhead(images, 16, 16, 2))


def test_a_run_decoding_ahead_caches_what_a_run_without_it_does(tiny_module, colour_dir, tmp_path, monkeypatch):
    used = []
    real = pipeline.decode_ahead

    def spied(*args):
        looked_up, ahead = real(*args)
        used.append(ahead)
        return looked_up, ahead

    monkeypatch.setattr(pipeline, "decode_ahead", spied)
    a = retrain.train(colour_dir, tiny_module, tmp_path / "a", cache_dir=str(tmp_path / "ca"), quantize=(), **FAST)
    assert len(used) == 1 and used[0] is not None and used[0]._taken and not used[0]._thread.is_alive()
    monkeypatch.setattr(pipeline, "decode_ahead", lambda *args: (None, None))
    b = retrain.train(colour_dir, tiny_module, tmp_path / "b", cache_dir=str(tmp_path / "cb"), quantize=(), **FAST)
    assert a.cache["misses"] == b.cache["misses"] == 30
    from retrain.features.bottlenecks import BottleneckCache

    images = scan_folder(colour_dir).images
    keys = [i.content_hash for i in images]
    found = [BottleneckCache(tmp_path / c, a.module["fingerprint"], _key(a)).lookup(keys) for c in ("ca", "cb")]
    assert len(found[0]) == 30 and all(np.array_equal(found[0][k], found[1][k]) for k in keys)


def _key(result):
    from retrain.features.module import InputSpec

    spec = result.module["input_spec"]
    return InputSpec(spec["height"], spec["width"]).key()


def test_a_wrong_size_read_from_the_protobuf_only_costs_the_decoding(tiny_module, colour_dir, tmp_path, monkeypatch):
    from retrain.features import audit

    real = audit.declared_image_size
    monkeypatch.setattr(audit, "declared_image_size", lambda proto: (20, 20) if real(proto) else None)
    closed = []
    real_close = DecodedAhead.close
    monkeypatch.setattr(DecodedAhead, "close", lambda self: (closed.append(self), real_close(self)))
    result = retrain.train(colour_dir, tiny_module, tmp_path / "o", cache_dir=str(tmp_path / "c"), quantize=(), **FAST)
    assert result.cache["misses"] == 30 and closed and not closed[0]._taken  # not used: decoded again at 32x32


def test_the_float32_file_from_the_module_s_conversion_gives_the_converter_s_probabilities(tiny_module, tmp_path):
    import tensorflow as tf

    from retrain.evaluation.runner import TFLiteRunner
    from retrain.features import lite
    from retrain.features.module import load_module
    from retrain.serving.checks import write_tflite_files
    from retrain.serving.tflite import build_serving_model

    module = load_module(tiny_module)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(module.info.feature_dim, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    serving = build_serving_model(module, kernel, bias, str(tmp_path / "labels.txt"))
    metadata = {"name": "n", "description": "d", "version": "1", "height": 32, "width": 32,
                "input_description": "i", "output_description": "o"}
    (tmp_path / "converted").mkdir()
    (tmp_path / "composed").mkdir()
    converted = write_tflite_files(serving, tmp_path / "converted", ["float32", "int8"], ["a", "b", "c"], None, metadata)
    composed = write_tflite_files(serving, tmp_path / "composed", ["float32", "int8"], ["a", "b", "c"], None, metadata,
                                  append_head(lite.convert_module(module), kernel, bias))
    pixels = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    reference = serving.functions.serve_fixed(tf.constant(pixels))["probabilities"].numpy()
    for name in ("float32", "int8"):
        a, b = TFLiteRunner(converted[name]), TFLiteRunner(composed[name])
        assert b.classes == ["a", "b", "c"]
        assert np.abs(a.predict(pixels) - b.predict(pixels)).max() < 1e-6
        assert np.abs(b.predict(pixels) - reference).max() < (1e-5 if name == "float32" else 5e-2)
    with pytest.raises(ValueError, match="not \\[n, 5\\]"):
        append_head(lite.convert_module(module), kernel[:5], bias)


def test_train_makes_the_float32_file_from_the_module_and_fine_tuning_converts_the_graph(tiny_module, colour_dir,
                                                                                        tmp_path, monkeypatch):
    frozen = retrain.train(colour_dir, tiny_module, tmp_path / "a", cache_dir=str(tmp_path / "c"), **FAST)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["tflite"]["float32"]["made"] == MADE_FROM_MODULE
    assert metrics["tflite"]["float32"]["agreement"] == 1.0 and metrics["tflite"]["float32"]["max_abs_diff"] < 1e-5
    assert frozen.artifacts["tflite_int8"]
    from retrain.features import lite

    assert lite.converted_path(tmp_path / "c", _info(frozen)).is_file()  # made for the export and cached
    tuned = retrain.train(colour_dir, tiny_module, tmp_path / "b", cache_dir=str(tmp_path / "c"), fine_tune=True,
                          fine_tune_epochs=1, **FAST)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["tflite"]["float32"]["made"] == MADE_BY_CONVERTER
    assert tuned.artifacts["tflite_float32"]

    def broken(*args):
        raise ValueError("an unexpected graph")

    monkeypatch.setattr(compose, "append_head", broken)
    retrain.train(colour_dir, tiny_module, tmp_path / "d", cache_dir=str(tmp_path / "c"), **FAST)
    row = json.loads((tmp_path / "d" / "metrics.json").read_text())["tflite"]["float32"]
    assert row["made"].startswith(MADE_BY_CONVERTER) and "an unexpected graph" in row["made"]
    assert row["agreement"] == 1.0


def _info(result):
    from types import SimpleNamespace

    from retrain.features.module import InputSpec

    spec = result.module["input_spec"]
    return SimpleNamespace(fingerprint=result.module["fingerprint"], input_spec=InputSpec(spec["height"], spec["width"]))


def test_the_saved_model_holds_its_three_signatures_and_no_function_twice(tiny_module, colour_dir, tmp_path):
    from retrain.features.audit import read_saved_model

    retrain.train(colour_dir, tiny_module, tmp_path / "o", cache_dir=str(tmp_path / "c"), quantize=(), **FAST)
    proto = read_saved_model(tmp_path / "o" / "saved_model")
    meta_graph = proto.meta_graphs[0]
    assert set(meta_graph.signature_def) - {"__saved_model_init_op"} == {"serving_default", "serving_fixed", "serving_bytes"}
    root = meta_graph.object_graph_def.nodes[0]
    assert not {c.local_name for c in root.children} & {"serve", "serve_fixed", "serve_bytes"}


def test_the_serving_model_traced_ahead_saves_what_one_built_with_its_head_does(tiny_module, tmp_path):
    """Built and traced with a head of zeros while the head trains, then given the head: the same
    saved variables, signatures and probabilities as the model built with the head."""
    import tensorflow as tf

    from retrain.errors import ModelError
    from retrain.features.audit import read_saved_model
    from retrain.features.module import load_module
    from retrain.serving.tflite import build_serving_model, save_serving_model, traced_serving_model

    module = load_module(tiny_module)
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(module.info.feature_dim, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    ahead = traced_serving_model(module, ["a", "b", "c"])
    assert all(f.experimental_get_tracing_count() == 1 for f in vars(ahead.functions).values())
    with pytest.raises(ModelError, match="a head of shape \\(3, 3\\)"):
        ahead.set_head(kernel[:3], bias)
    ahead.set_head(kernel, bias)
    with pytest.raises(ModelError, match="no labels file attached"):
        save_serving_model(ahead, tmp_path / "unlabelled")
    (tmp_path / "other.txt").write_text("a\nc\nb\n")
    with pytest.raises(ModelError, match="does not list the serving model's classes"):
        ahead.attach_labels(str(tmp_path / "other.txt"))
    ahead.attach_labels(str(tmp_path / "labels.txt"))
    save_serving_model(ahead, tmp_path / "ahead")
    assert all(f.experimental_get_tracing_count() == 1 for f in vars(ahead.functions).values())  # not traced again
    save_serving_model(build_serving_model(module, kernel, bias, str(tmp_path / "labels.txt")), tmp_path / "direct")
    a, b = (tf.train.load_checkpoint(str(tmp_path / name / "variables" / "variables")) for name in ("ahead", "direct"))
    assert a.get_variable_to_shape_map() == b.get_variable_to_shape_map()
    for key in a.get_variable_to_shape_map():
        if key.endswith("VARIABLE_VALUE"):
            np.testing.assert_array_equal(a.get_tensor(key), b.get_tensor(key))
    assert (tmp_path / "ahead" / "assets" / "labels.txt").read_text() == "a\nb\nc\n"
    proto_a, proto_b = (read_saved_model(tmp_path / name) for name in ("ahead", "direct"))
    assert proto_a.meta_graphs[0].signature_def == proto_b.meta_graphs[0].signature_def
    children = [[c.local_name for c in p.meta_graphs[0].object_graph_def.nodes[0].children] for p in (proto_a, proto_b)]
    assert children[0] == children[1]  # the same objects saved, nothing tracked beside them
    assert sorted(children[0]) == ["head_bias", "head_kernel", "labels", "module_variables", "signatures"]
    pixels = tf.constant(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    loaded_a, loaded_b = (tf.saved_model.load(str(tmp_path / name)) for name in ("ahead", "direct"))
    got = loaded_a.signatures["serving_fixed"](images=pixels)["probabilities"].numpy()
    np.testing.assert_array_equal(got, loaded_b.signatures["serving_fixed"](images=pixels)["probabilities"].numpy())
    assert np.abs(got - tf.nn.softmax(module.pixel_features(pixels) @ kernel + bias).numpy()).max() < 1e-5
