"""The module's slim copy: made on the first load, loaded instead of the module later, giving
exactly the module's vectors; a damaged or altered copy is never used."""

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


def test_first_load_makes_the_copy_and_later_loads_use_it_with_identical_vectors(tiny_module, tmp_path):
    import tensorflow as tf

    cache = tmp_path / "cache"
    first = load_module(tiny_module, slim_dir=cache)
    assert first.info.slim_copy is None  # the module itself, and a copy made from it
    assert first.info.loaded == "partial"  # only its __call__ and variable lists were rebuilt
    records = list((cache / SLIM_FOLDER).glob("*.json"))
    assert len(records) == 1 and len(json.loads(records[0].read_text())["probe"]["sha256"]) == 64
    second = load_module(tiny_module, slim_dir=cache)
    assert second.info.slim_copy is not None and Path(second.info.slim_copy).parent == cache / SLIM_FOLDER
    full = load_module(tiny_module)
    assert (second.info.loaded, full.info.loaded) == ("slim", "full")
    pixels = tf.constant(_pixels())
    assert np.array_equal(second.pixel_features(pixels).numpy(), full.pixel_features(pixels).numpy())
    assert np.array_equal(first.pixel_features(pixels).numpy(), full.pixel_features(pixels).numpy())
    assert [v.numpy().tobytes() for v in first.obj.variables] == [v.numpy().tobytes() for v in full.obj.variables]
    assert (second.info.fingerprint, second.info.input_spec, second.info.feature_dim) == (
        full.info.fingerprint, full.info.input_spec, full.info.feature_dim)
    assert len(second.obj.variables) == len(full.obj.variables)


def test_a_model_trained_through_the_copy_equals_one_trained_through_the_module(tiny_module, colour_dir, tmp_path):
    cache = tmp_path / "cache"
    plain = retrain.train(colour_dir, tiny_module, tmp_path / "a", cache_dir=str(cache), fine_tune=False, **FAST)
    slim = retrain.train(colour_dir, tiny_module, tmp_path / "b", cache_dir=str(cache), **FAST)
    assert plain.module["slim_copy"] is None and slim.module["slim_copy"] is not None
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
    assert again.info.slim_copy is None  # the module itself: the copy's files changed
    assert json.loads(record.read_text())["folder"] != folder.name  # and a new copy recorded
    assert load_module(tiny_module, slim_dir=cache).info.slim_copy is not None


def test_a_copy_that_does_not_reproduce_the_module_is_never_used(tiny_module, tmp_path, monkeypatch):
    import retrain.features.slim as slim

    cache = tmp_path / "cache"
    load_module(tiny_module, slim_dir=cache)  # the copy and the digest of the module's probe vectors
    real = slim._digest
    monkeypatch.setattr(slim, "_digest", lambda vectors: real(vectors + 1e-7))  # the copy's vectors, a little off
    assert load_module(tiny_module, slim_dir=cache).info.slim_copy is None
    monkeypatch.undo()
    record = json.loads(next((cache / SLIM_FOLDER).glob("*.json")).read_text())
    assert "differ" in record["rejected"]["reason"]
    assert load_module(tiny_module, slim_dir=cache).info.slim_copy is None  # not used, not made again
    assert len([p for p in (cache / SLIM_FOLDER).iterdir() if p.is_dir()]) == 1


@pytest.mark.parametrize("fine_tune", [True])
def test_fine_tuning_loads_the_module_itself(tiny_module, colour_dir, tmp_path, fine_tune):
    cache = tmp_path / "cache"
    load_module(tiny_module, slim_dir=cache)
    result = retrain.train(colour_dir, tiny_module, tmp_path / "o", cache_dir=str(cache), fine_tune=fine_tune,
                           fine_tune_epochs=1, **FAST)
    assert result.module["slim_copy"] is None
