"""Behaviour that had no test that could fail: metrics against hand-computed values, the minibatch
head's early stopping, --validation-dir / --test-dir and a variable-size module through the CLI,
export --representative, predict with nothing readable, the NumPy resize against TensorFlow's."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from retrain.cli import main
from retrain.config import TrainConfig
from retrain.data.dataset import scan_folder
from retrain.evaluation.evaluate import classification_metrics, top_k_accuracy
from retrain.training.head import train_head_minibatch
from tiny_modules import save_tiny_module, write_colour_images


def test_precision_recall_f1_and_top_k_against_values_computed_by_hand():
    truth = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2])
    m = classification_metrics(truth, predicted, ["a", "b", "c"])
    # a: tp 2, predicted 3, support 3; b: tp 1, predicted 2, support 2; c: tp 3, predicted 4, support 4
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["b"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "support": 4})
    assert m["accuracy"] == pytest.approx(6 / 9) and m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    labels = np.array([1, 0, 2])
    # top-1: none right; top-2: row 0 (1 in {0,1}), row 2 (2 in {1, 0|2}: ties broken by order -> {1, 0}) -> 1 of 3
    assert top_k_accuracy(labels, probabilities, 1) == 0.0
    assert top_k_accuracy(labels, probabilities, 2) == pytest.approx(1 / 3)
    assert top_k_accuracy(labels, probabilities, 3) == 1.0


def test_minibatch_head_stops_early_and_keeps_its_best_epoch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = rng.integers(0, 2, 60)  # noise: validation loss bottoms out early, then rises as the head overfits
    val_x, val_y = rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 2, 40)
    config = TrainConfig(head="minibatch", epochs=200, patience=5, learning_rate=0.05, dropout=0.0, l2=0.0,
                         label_smoothing=0.0, batch_size=8)
    head = train_head_minibatch(x, y, val_x, val_y, 2, config)
    losses = head.history["val_loss"]
    assert head.epochs_run < 200 and head.epochs_run == head.best_epoch + config.patience
    assert head.best_epoch == int(np.argmin(losses)) + 1
    logits = val_x @ head.kernel + head.bias
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert -logp[np.arange(len(val_y)), val_y].mean() == pytest.approx(min(losses), rel=1e-4)  # the best weights


def test_validation_and_test_folders_through_the_cli(tiny_module, colour_dir, tmp_path):
    held = write_colour_images(tmp_path / "held", counts={"blue": 4, "green": 4, "red": 4}, seed=9)
    tested = write_colour_images(tmp_path / "tested", counts={"blue": 5, "green": 5, "red": 5}, seed=8)
    out = tmp_path / "out"
    done = CliRunner().invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(out), "--cache-dir",
                                     str(tmp_path / "c"), "--validation-dir", str(held), "--test-dir", str(tested),
                                     "--keep-validation", "--quantize", "none", "--json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["split"] == {"train": 30, "validation": 12, "test": 15}
    assert result["metrics"]["test"]["n_images"] == 15 and result["metrics"]["validation"]["n_images"] == 12
    tested_paths = {i.path for i in scan_folder(tested).images}
    assert not tested_paths & {e["path"] for e in result["label_errors"]}  # test images never trained on


def test_a_variable_size_module_end_to_end(colour_dir, tmp_path):
    module = save_tiny_module(tmp_path / "any", variable_size=True)
    out = tmp_path / "out"
    refused = CliRunner().invoke(main, ["train", str(colour_dir), "-m", module, "-o", str(out)])
    assert refused.exit_code == 1 and "--image-size" in refused.stderr
    done = CliRunner().invoke(main, ["train", str(colour_dir), "-m", module, "-o", str(out), "--image-size", "48",
                                     "--cache-dir", str(tmp_path / "c"), "--json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["module"]["input_spec"]["height"] == 48 and result["metrics"]["test"]["accuracy"] == 1.0
    predicted = CliRunner().invoke(main, ["predict", str(out / "model_int8.tflite"),
                                          str(next((colour_dir / "green").iterdir())), "--json"])
    assert json.loads(predicted.stdout)["top"][0]["class"] == "green"


def test_export_calibrates_from_the_representative_folder(tiny_module, colour_dir, tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(out), "--cache-dir",
                                     str(tmp_path / "c"), "--quantize", "none", "-q"]).exit_code == 0
    calibration = write_colour_images(tmp_path / "calibration", counts={"blue": 3, "green": 3, "red": 3}, seed=4)
    done = CliRunner().invoke(main, ["export", str(out), "--format", "tflite-int8-full", "--representative",
                                     str(calibration), "--json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    figures = json.loads(done.stdout)["tflite"]["int8-full"]
    assert figures["accuracy"] >= 0.99 and (out / "model_int8_full.tflite").is_file()
    unused = CliRunner().invoke(main, ["export", str(out), "--format", "tflite-int8", "--representative", str(calibration)])
    assert unused.exit_code == 1 and "needs no calibration" in unused.stderr
    empty = tmp_path / "no images"
    (empty / "blue").mkdir(parents=True)
    (empty / "blue" / "notes.txt").write_text("no image here")
    refused = CliRunner().invoke(main, ["export", str(out), "--format", "tflite-int8-full", "--representative", str(empty)])
    assert refused.exit_code == 1 and "has no usable images" in refused.stderr


def test_predict_exits_1_when_no_image_can_be_read(tiny_module, colour_dir, tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(out), "--cache-dir",
                                     str(tmp_path / "c"), "--quantize", "none", "-q"]).exit_code == 0
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    done = CliRunner().invoke(main, ["predict", str(out / "model.tflite"), str(broken)])
    assert done.exit_code == 1 and "Error: no image could be read" in done.stderr
    good = next((colour_dir / "red").iterdir())
    mixed = CliRunner().invoke(main, ["predict", str(out / "model.tflite"), str(broken), str(good)])
    assert mixed.exit_code == 0 and f"{broken}: skipped" in mixed.stderr


def test_the_numpy_resize_matches_tensorflow():
    from retrain.data.images import resize_bilinear_numpy, resize_to_uint8

    rng = np.random.default_rng(0)
    for shape, size in [((37, 53), (224, 224)), ((500, 375), (224, 224)), ((7, 3), (32, 32)), ((300, 400), (301, 399))]:
        image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        ours = resize_bilinear_numpy(image, *size).astype(int)
        theirs = resize_to_uint8(image, *size).numpy().astype(int)
        assert np.abs(ours - theirs).max() <= 1 and (ours == theirs).mean() >= 0.999
