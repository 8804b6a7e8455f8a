"""The module's slim copy: its SavedModel cut to the inference trace, made on the first load and
loaded instead of the module, giving exactly the module's vectors; an altered copy is never used."""

import json
from pathlib import Path

import numpy as np
import pytest

import retrain
from retrain.features.module import load_module
from retrain.features.slim import SLIM_FOLDER

FAST = dict(epochs=30, learning_rate=0.05, quantize=())


def _pixels(size=32, n=6, seed=3):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_the_copy_is_made_on_the_first_load_and_gives_the_modules_vectors_bit_for_bit(tmp_path):
    import tensorflow as tf

    from retrain.features.audit import read_saved_model
    from tiny_modules import save_tiny_module

    module = save_tiny_module(tmp_path / "bn", batch_norm=True)  # its training=True trace updates statistics
    cache = tmp_path / "cache"
    first = load_module(module, slim_dir=cache)
    assert first.info.loaded == "slim" and Path(first.info.slim_copy).parent == cache / SLIM_FOLDER
    records = list((cache / SLIM_FOLDER).glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["folder"] == Path(first.info.slim_copy).name
    second = load_module(module, slim_dir=cache)
    assert second.info.slim_copy == first.info.slim_copy  # the same copy, not a new one
    assert len([p for p in (cache / SLIM_FOLDER).iterdir() if p.is_dir()]) == 1
    full = load_module(module)
    assert full.info.loaded == "full"
    pixels = tf.constant(_pixels())
    for loaded in (first, second):
        assert np.array_equal(loaded.pixel_features(pixels).numpy(), full.pixel_features(pixels).numpy())
        assert [v.numpy().tobytes() for v in loaded.obj.variables] == [v.numpy().tobytes() for v in full.obj.variables]
        assert (loaded.info.fingerprint, loaded.info.input_spec, loaded.info.feature_dim, loaded.info.trainable_variables) == (
            full.info.fingerprint, full.info.input_spec, full.info.feature_dim, full.info.trainable_variables)
    # The copy holds the module's inference trace alone, byte for byte, and no training trace.
    original = {f.signature.name: f for f in read_saved_model(Path(module)).meta_graphs[0].graph_def.library.function}
    copied = read_saved_model(Path(first.info.slim_copy)).meta_graphs[0].graph_def.library.function
    assert 0 < len(copied) < len(original)
    assert all(f == original[f.signature.name] for f in copied)
    training_ops = {n.op for f in original.values() for n in f.node_def}
    assert "AssignVariableOp" in training_ops  # the training trace updates the moving statistics
    assert "AssignVariableOp" not in {n.op for f in copied for n in f.node_def}


def test_a_model_trained_through_the_copy_equals_one_trained_through_the_module(tiny_module, colour_dir, tmp_path):
    cache = tmp_path / "cache"
    from retrain.features import slim as slim_copies

    real = slim_copies.make_slim
    slim_copies.make_slim = lambda *args: None  # no copy: the module's own parts
    try:
        plain = retrain.train(colour_dir, tiny_module, tmp_path / "a", cache_dir=str(cache), **FAST)
    finally:
        slim_copies.make_slim = real
    slim = retrain.train(colour_dir, tiny_module, tmp_path / "b", cache_dir=str(cache), **FAST)
    assert (plain.module["loaded"], plain.module["slim_copy"]) == ("partial", None) and slim.module["slim_copy"] is not None
    from retrain.evaluation.runner import SavedModelRunner, TFLiteRunner

    pixels = _pixels()
    for name in ("saved_model",):
        a, b = SavedModelRunner(tmp_path / "a" / name), SavedModelRunner(tmp_path / "b" / name)
        assert np.array_equal(a.predict(pixels), b.predict(pixels))
    a, b = TFLiteRunner(tmp_path / "a" / "model.tflite"), TFLiteRunner(tmp_path / "b" / "model.tflite")
    assert np.abs(a.predict(pixels) - b.predict(pixels)).max() < 1e-6
    assert json.loads((tmp_path / "b" / "run.json").read_text())["module"]["slim_copy"] == slim.module["slim_copy"]


def test_an_altered_copy_is_ignored_and_made_anew(tiny_module, tmp_path):
    cache = tmp_path / "cache"
    load_module(tiny_module, slim_dir=cache)
    record = next((cache / SLIM_FOLDER).glob("*.json"))
    folder = cache / SLIM_FOLDER / json.loads(record.read_text())["folder"]
    variables = next((folder / "variables").glob("*.data-*"))
    data = bytearray(variables.read_bytes())
    data[-1] ^= 0xFF
    variables.write_bytes(bytes(data))
    again = load_module(tiny_module, slim_dir=cache)
    assert again.info.loaded == "slim" and Path(again.info.slim_copy).name != folder.name  # a new copy
    assert json.loads(record.read_text())["folder"] == Path(again.info.slim_copy).name
    assert variables.read_bytes() == bytes(data)  # the altered one is left as it is: nothing is deleted


def test_a_copy_that_cannot_be_loaded_alone_is_rejected_and_never_made_again(tiny_module, tmp_path, monkeypatch):
    import tensorflow.python.saved_model.load as tf_load

    cache = tmp_path / "cache"
    real = tf_load.load_partial

    def refuse(path, filters, *args, **kwargs):
        if Path(path).parent.name == SLIM_FOLDER:
            raise ValueError("Unable to partially load SavedModel since the specified filter does not include all")
        return real(path, filters, *args, **kwargs)

    monkeypatch.setattr(tf_load, "load_partial", refuse)
    loaded = load_module(tiny_module, slim_dir=cache)
    assert (loaded.info.loaded, loaded.info.slim_copy) == ("partial", None)  # the module's own parts
    record = json.loads(next((cache / SLIM_FOLDER).glob("*.json")).read_text())
    assert "cannot be loaded alone" in record["rejected"]["reason"]
    monkeypatch.undo()
    assert load_module(tiny_module, slim_dir=cache).info.loaded == "partial"  # not used, not made again
    assert len([p for p in (cache / SLIM_FOLDER).iterdir() if p.is_dir()]) == 1


def test_a_module_without_call_gets_no_copy(tmp_path):
    import tensorflow as tf

    class Signature(tf.Module):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(np.ones((3, 4), np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
        def serve(self, images):
            return {"feature_vector": tf.reduce_mean(images, [1, 2]) @ self.scale}

    obj = Signature()
    tf.saved_model.save(obj, str(tmp_path / "m"), signatures={"serving_default": obj.serve})
    loaded = load_module(tmp_path / "m", slim_dir=tmp_path / "cache")
    assert (loaded.info.loaded, loaded.info.slim_copy, loaded.info.feature_dim) == ("full", None, 4)
    assert not (tmp_path / "cache" / SLIM_FOLDER).exists() or not any((tmp_path / "cache" / SLIM_FOLDER).iterdir())


@pytest.mark.parametrize("fine_tune", [True])
def test_fine_tuning_loads_the_module_itself(tiny_module, colour_dir, tmp_path, fine_tune):
    cache = tmp_path / "cache"
    load_module(tiny_module, slim_dir=cache)
    result = retrain.train(colour_dir, tiny_module, tmp_path / "o", cache_dir=str(cache), fine_tune=fine_tune,
                           fine_tune_epochs=1, **FAST)
    assert result.module["slim_copy"] is None
