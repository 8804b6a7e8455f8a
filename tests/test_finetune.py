"""--fine-tune on a tiny module with batch norm: the module's weights change, batch-norm
statistics do not, the export serves the new weights, and a run that does not improve keeps
the frozen module."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

import retrain
from retrain.cli import main
from retrain.errors import ConfigError, ModuleError
from retrain.training.finetune import weights_fingerprint
from retrain.evaluation.runner import SavedModelRunner
from tiny_modules import save_tiny_module

FAST = dict(epochs=40, learning_rate=0.05, patience=10, quantize=())


@pytest.fixture(scope="module")
def bn_module(tmp_path_factory):
    return save_tiny_module(tmp_path_factory.mktemp("modules") / "tiny_bn", batch_norm=True)


@pytest.fixture(scope="module")
def frozen(bn_module, colour_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen") / "out"
    # the same head as the fine-tuned runs start from: trained without the validation images
    result = retrain.train(colour_dir, bn_module, out, cache_dir=str(tmp_path_factory.mktemp("cache")),
                           keep_validation=True, **FAST)
    return result, out


@pytest.fixture(scope="module")
def tuned(bn_module, colour_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "out"
    cache = tmp_path_factory.mktemp("cache")
    args = ["train", str(colour_dir), "-m", bn_module, "-o", str(out), "--cache-dir", str(cache), "--json",
            "--epochs", "40", "--learning-rate", "0.05", "--quantize", "int8", "--fine-tune", "--fine-tune-epochs", "4"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out, cache


def _pixels(colour_dir, size=32):
    from retrain.data.images import load_image

    paths = sorted(str(p) for p in colour_dir.rglob("*.jpg"))
    return np.stack([load_image(p, size, size) for p in paths])


def _saved_variables(out):
    import tensorflow as tf

    variables = list(tf.saved_model.load(str(out / "saved_model")).module_variables)
    return SimpleNamespace(obj=SimpleNamespace(variables=variables)), {v.name: v.numpy() for v in variables}


def test_fine_tuning_changes_module_weights_and_records_them(tuned, bn_module):
    data, out, _ = tuned
    fine = data["fine_tune"]
    assert fine["kept"] == "fine_tuned" and fine["weights_changed"] is True
    assert 1 <= fine["best_epoch"] <= fine["epochs_run"] <= 4
    assert fine["learning_rate"] == pytest.approx(0.005)  # --learning-rate / 10
    assert fine["best_validation"]["loss"] < fine["frozen_validation"]["loss"]
    assert fine["best_validation"]["accuracy"] >= fine["frozen_validation"]["accuracy"]
    assert data["timings"]["fine_tune"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["module"]["weights_changed"] is True
    assert run["module"]["weights_fingerprint"] == fine["weights_fingerprint"] != fine["original_weights_fingerprint"]
    assert run["fine_tune"]["kept"] == "fine_tuned"
    assert "fine-tuned" in (out / "README.md").read_text()


def test_export_serves_the_fine_tuned_weights_with_frozen_batch_norm(tuned, bn_module):
    from retrain.features.module import load_module

    data, out, _ = tuned
    saved, values = _saved_variables(out)
    assert weights_fingerprint(saved) == data["module"]["weights_fingerprint"]
    original = {v.name: v.numpy() for v in load_module(bn_module).obj.variables}
    assert set(values) == set(original)
    for name in ("bn/moving_mean:0", "bn/moving_variance:0"):
        np.testing.assert_array_equal(values[name], original[name])  # statistics frozen
    assert not np.allclose(values["conv/kernel:0"], original["conv/kernel:0"])  # weights trained


def test_fine_tuned_export_differs_from_frozen_and_tflite_agrees(tuned, frozen, colour_dir):
    data, out, _ = tuned
    _, frozen_out = frozen
    pixels = _pixels(colour_dir)
    tuned_p = SavedModelRunner(out / "saved_model").predict(pixels)
    frozen_p = SavedModelRunner(frozen_out / "saved_model").predict(pixels)
    assert np.abs(tuned_p - frozen_p).max() > 1e-4
    assert data["metrics"]["test"]["accuracy"] == 1.0
    assert data["metrics"]["tflite"]["float32"]["agreement"] == 1.0
    assert data["metrics"]["tflite"]["float32"]["max_abs_diff"] < 1e-4
    assert data["metrics"]["tflite"]["int8"]["accuracy"] >= 0.8


def test_fine_tune_in_memory_matches_the_export(bn_module, colour_dir, tmp_path):
    import tensorflow as tf

    from retrain.features.bottlenecks import BottleneckCache, extract_bottlenecks
    from retrain.config import TrainConfig
    from retrain.data.dataset import split_dataset
    from retrain.serving.tflite import build_serving_model, save_serving_model
    from retrain.training.finetune import fine_tune
    from retrain.training.head import train_head_minibatch
    from retrain.data.images import to_module_input
    from retrain.features.module import load_module

    config = TrainConfig(epochs=40, learning_rate=0.05, fine_tune=True, fine_tune_epochs=3)
    split = split_dataset(colour_dir, 10, 10)
    module = load_module(bn_module)
    cache = BottleneckCache(tmp_path / "cache", module.info.fingerprint, module.info.input_spec.key())
    vectors = extract_bottlenecks(split.train + split.validation, module, cache).vectors
    x = np.stack([vectors[i.content_hash] for i in split.train])
    head = train_head_minibatch(x, np.asarray([i.label for i in split.train]), None, None, 3, config)
    pixels = _pixels(colour_dir)

    def in_memory(kernel, bias):
        features = module.features(to_module_input(tf.constant(pixels), (0.0, 1.0))).numpy()
        return tf.nn.softmax(features @ kernel + bias).numpy()

    before = in_memory(head.kernel, head.bias)
    result = fine_tune(module, head.kernel, head.bias, split.train, split.validation, 3, config)
    assert result.weights_changed
    after = in_memory(result.kernel, result.bias)
    assert np.abs(after - before).max() > 1e-4
    labels = tmp_path / "labels.txt"
    labels.write_text("blue\ngreen\nred\n")
    save_serving_model(build_serving_model(module, result.kernel, result.bias, str(labels)), tmp_path / "saved_model")
    np.testing.assert_allclose(SavedModelRunner(tmp_path / "saved_model").predict(pixels), after, atol=1e-5)


def test_no_improvement_keeps_the_frozen_module(bn_module, colour_dir, frozen, tmp_path):
    _, frozen_out = frozen
    # A learning rate this large ruins the weights in one step: no epoch can beat the frozen start.
    result = retrain.train(colour_dir, bn_module, tmp_path / "out", cache_dir=str(tmp_path / "c"), fine_tune=True,
                           fine_tune_epochs=2, fine_tune_learning_rate=1e4, **FAST)
    assert result.fine_tune["kept"] == "frozen" and result.fine_tune["best_epoch"] == 0
    assert result.module["weights_changed"] is False
    assert result.module["weights_fingerprint"] == result.fine_tune["original_weights_fingerprint"]
    assert any("frozen module's weights were kept" in w for w in result.warnings)
    pixels = _pixels(colour_dir)
    np.testing.assert_allclose(SavedModelRunner(tmp_path / "out" / "saved_model").predict(pixels),
                               SavedModelRunner(frozen_out / "saved_model").predict(pixels), atol=1e-6)
    assert result.metrics["test"]["accuracy"] == 1.0


def test_the_cache_never_holds_fine_tuned_vectors(tuned, bn_module, colour_dir, tmp_path):
    from retrain.features.bottlenecks import BottleneckCache, extract_bottlenecks
    from retrain.data.dataset import scan_folder
    from retrain.features.module import load_module

    _, _, cache_dir = tuned
    module = load_module(bn_module)
    images = scan_folder(colour_dir).images
    key = module.info.input_spec.key()
    fresh = extract_bottlenecks(images, module, BottleneckCache(tmp_path, module.info.fingerprint, key))
    cached = extract_bottlenecks(images, module, BottleneckCache(cache_dir, module.info.fingerprint, key))
    assert (cached.hits, cached.misses) == (30, 0)
    for k, vector in fresh.vectors.items():
        np.testing.assert_allclose(cached.vectors[k], vector, atol=1e-6)


def test_module_without_trainable_variables_is_a_clear_error(colour_dir, tmp_path):
    fixed = save_tiny_module(tmp_path / "fixed", trainable=False)
    cache = tmp_path / "cache"
    with pytest.raises(ModuleError, match="has no trainable variables, so it cannot be fine-tuned"):
        retrain.train(colour_dir, fixed, tmp_path / "out", cache_dir=str(cache), fine_tune=True, **FAST)
    assert not cache.exists() and not (tmp_path / "out").exists()  # failed before any work
    result = CliRunner().invoke(main, ["train", str(colour_dir), "-m", fixed, "-o", str(tmp_path / "out"),
                                       "--cache-dir", str(cache), "--fine-tune"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: module ") and len(result.stderr.strip().splitlines()) == 1


def test_fine_tune_needs_validation_images(bn_module, colour_dir, tmp_path):
    with pytest.raises(ConfigError, match="--fine-tune needs validation images"):
        retrain.train(colour_dir, bn_module, tmp_path / "out", validation_percent=0, fine_tune=True, **FAST)
    with pytest.raises(ConfigError, match="--fine-tune-learning-rate needs --fine-tune"):
        retrain.train(colour_dir, bn_module, tmp_path / "out", fine_tune_learning_rate=0.001, **FAST)
