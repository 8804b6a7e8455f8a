"""The Python API end to end on a tiny module: train, export, evaluate, predict."""

import json
import shutil

import numpy as np
import pytest

import retrain
from retrain.errors import ConfigError, OutputError
from retrain.serving.tflite import read_tflite_labels
from tiny_modules import write_colour_images

FAST = dict(epochs=40, learning_rate=0.05, patience=10)


@pytest.fixture(scope="module")
def trained(tiny_module, colour_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "out"
    cache = tmp_path_factory.mktemp("cache")
    result = retrain.train(colour_dir, tiny_module, out, cache_dir=str(cache), quantize=("int8",), **FAST)
    return result, out, cache


def test_train_writes_every_artifact(trained):
    result, out, _ = trained
    for name in ("saved_model/saved_model.pb", "model.tflite", "model_int8.tflite", "labels.txt", "run.json", "metrics.json"):
        assert (out / name).exists(), name
    assert (out / "labels.txt").read_text().splitlines() == ["blue", "green", "red"]
    assert read_tflite_labels(out / "model.tflite") == ["blue", "green", "red"]
    assert not list(out.parent.glob(".out.partial-*"))


def test_run_json_records_module_config_and_split(trained, tiny_module):
    result, out, _ = trained
    run = json.loads((out / "run.json").read_text())
    assert run["tool"] == "retrain"
    assert run["module"]["handle"] == str(tiny_module)
    assert len(run["module"]["fingerprint"]) == 64
    assert run["module"]["input_spec"]["height"] == 32
    assert run["config"]["learning_rate"] == 0.05
    assert sum(run["split"].values()) == 30
    assert run["versions"]["tensorflow"].startswith("2.")


def test_solid_colours_are_learned_and_tflite_agrees(trained):
    result, out, _ = trained
    assert result.metrics["test"]["accuracy"] == 1.0
    assert "validation" not in result.metrics and result.split["validation"] == 0
    assert result.head["solver"] == "logistic" and result.head["validation_folded"] >= 3  # one per class at least
    assert result.metrics["cross_validation"]["accuracy"] == 1.0
    assert result.metrics["tflite"]["float32"]["agreement"] == 1.0
    assert result.metrics["tflite"]["float32"]["max_abs_diff"] < 1e-4
    assert result.metrics["tflite"]["int8"]["accuracy"] >= 0.8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == result.metrics["test"]["accuracy"]


def test_second_run_computes_no_bottleneck(trained, tiny_module, colour_dir, tmp_path):
    result, _, cache = trained
    assert result.cache["misses"] == 30 and result.cache["hits"] == 0
    again = retrain.train(colour_dir, tiny_module, tmp_path / "again", cache_dir=str(cache), **FAST)
    assert again.cache == {**again.cache, "hits": 30, "misses": 0}


def test_adding_photos_computes_only_those(tiny_module, colour_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(colour_dir, data)
    cache = str(tmp_path / "cache")
    first = retrain.train(data, tiny_module, tmp_path / "a", cache_dir=cache, **FAST)
    assert first.cache["misses"] == 30
    write_colour_images(data, counts={"red": 2, "green": 1}, seed=7)
    second = retrain.train(data, tiny_module, tmp_path / "b", cache_dir=cache, **FAST)
    assert (second.cache["hits"], second.cache["misses"]) == (30, 3)


def test_evaluate_every_model_form(trained, colour_dir):
    _, out, _ = trained
    for model in (out, out / "saved_model", out / "model.tflite", out / "model_int8.tflite"):
        report = retrain.evaluate(model, colour_dir)
        assert report.n_images == 30
        assert report.classes == ["blue", "green", "red"]
        assert np.asarray(report.confusion_matrix).sum() == 30
        assert report.per_class["red"]["support"] == 10
    assert retrain.evaluate(out / "model.tflite", colour_dir).accuracy == retrain.evaluate(out, colour_dir).accuracy


def test_saved_model_takes_any_image_size(trained):
    import tensorflow as tf

    _, out, _ = trained
    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    red = np.zeros((1, 57, 91, 3), np.uint8)
    red[..., 0] = 220
    probabilities = serve(images=tf.constant(red))["probabilities"].numpy()
    assert probabilities.shape == (1, 3)
    assert abs(probabilities.sum() - 1) < 1e-5
    assert probabilities.argmax() == 2  # red


def test_predict_top_k(trained, colour_dir):
    _, out, _ = trained
    predictions = retrain.predict(out / "model.tflite", [colour_dir / "green"], top_k=2)
    assert len(predictions) == 10
    for p in predictions:
        assert len(p.top) == 2 and p.top[0]["class"] == "green"
        assert p.top[0]["probability"] >= p.top[1]["probability"]


def test_export_writes_requested_formats(trained, tmp_path):
    _, out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    written = retrain.export(copy, ["float16", "dynamic"])["artifacts"]
    assert set(written) == {"float16", "dynamic"}
    for path in written.values():
        assert read_tflite_labels(path) == ["blue", "green", "red"]


def test_bad_options_are_config_errors(tiny_module, colour_dir, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        retrain.train(colour_dir, tiny_module, tmp_path / "x", epoch=3)
    with pytest.raises(ConfigError, match="--validation-percent"):
        retrain.train(colour_dir, tiny_module, tmp_path / "x", validation_percent=120)
    with pytest.raises(ConfigError, match="unknown TFLite format 'int9'"):
        retrain.train(colour_dir, tiny_module, tmp_path / "x", quantize=("int9",))
    assert not (tmp_path / "x").exists()


def test_foreign_output_folder_is_refused_even_with_overwrite(tiny_module, colour_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="never replaces it, even with --overwrite"):
            retrain.train(colour_dir, tiny_module, out, cache_dir=str(tmp_path / "c"), overwrite=overwrite, **FAST)
    assert (out / "precious.txt").read_text() == "keep me"


def test_failed_export_leaves_previous_output_intact(trained, tiny_module, colour_dir, tmp_path, monkeypatch):
    import retrain.serving.checks

    _, out, cache = trained
    target = tmp_path / "target"
    shutil.copytree(out, target)
    before = (target / "model.tflite").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(retrain.serving.checks, "export_tflite", broken)
    with pytest.raises(RuntimeError):
        retrain.train(colour_dir, tiny_module, target, cache_dir=str(cache), overwrite=True, **FAST)
    assert (target / "model.tflite").read_bytes() == before
    assert not list(tmp_path.glob(".target.partial-*"))
