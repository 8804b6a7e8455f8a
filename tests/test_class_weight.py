"""--class-weight balanced: the formula, its effect on the loss, on a minority class's recall,
and the imbalance report."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from retrain.cli import main
from retrain.config import TrainConfig
from retrain.errors import ConfigError
from retrain.training.head import balanced_class_weights, train_head_minibatch
from tiny_modules import write_colour_images


def test_balanced_weights_follow_the_formula():
    labels = np.asarray([0] * 90 + [1] * 10 + [2] * 20)
    weights = balanced_class_weights(labels, 3)
    assert weights == pytest.approx({0: 120 / (3 * 90), 1: 120 / (3 * 10), 2: 120 / (3 * 20)})
    assert np.mean([weights[c] for c in labels]) == pytest.approx(1.0)  # the mean image weight stays 1


def _cross_entropy(x, y, kernel, bias):
    logits = x @ kernel + bias
    logits = logits - logits.max(axis=1, keepdims=True)
    return np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y]


def test_class_weights_scale_each_images_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.asarray([0] * 50 + [1] * 10)
    # One full batch, a learning rate too small to move: the epoch's loss is the loss of the start weights.
    config = TrainConfig(epochs=1, batch_size=60, optimizer="sgd", learning_rate=1e-12, momentum=0.0, dropout=0.0,
                         l2=0.0, label_smoothing=0.0, patience=0)
    plain = train_head_minibatch(x, y, None, None, 2, config)
    weights = balanced_class_weights(y, 2)
    weighted = train_head_minibatch(x, y, None, None, 2, config, class_weights=weights)
    np.testing.assert_allclose(weighted.kernel, plain.kernel)  # same seed: same start
    losses = _cross_entropy(x, y, plain.kernel, plain.bias)
    assert plain.history["loss"][0] == pytest.approx(losses.mean(), rel=1e-4)
    expected = (losses * np.asarray([weights[c] for c in y])).sum() / len(y)
    assert weighted.history["loss"][0] == pytest.approx(expected, rel=1e-4)
    assert weighted.history["loss"][0] != pytest.approx(plain.history["loss"][0], rel=1e-2)


def test_balanced_weights_raise_minority_recall():
    rng = np.random.default_rng(1)

    def blobs(n0, n1):
        shift = np.asarray([1.5] + [0.0] * 7)
        x = np.concatenate([rng.normal(0.0, 1.0, size=(n0, 8)), rng.normal(0.0, 1.0, size=(n1, 8)) + shift])
        return x.astype(np.float32), np.asarray([0] * n0 + [1] * n1)

    train_x, train_y = blobs(400, 40)  # separable only in part: the minority is outvoted without weights
    test_x, test_y = blobs(500, 500)
    config = TrainConfig(epochs=60, learning_rate=0.01, dropout=0.0)

    def minority_recall(class_weights):
        head = train_head_minibatch(train_x, train_y, None, None, 2, config, class_weights)
        predicted = head.probabilities(test_x).argmax(1)
        return float((predicted[test_y == 1] == 1).mean())

    plain, balanced = minority_recall(None), minority_recall(balanced_class_weights(train_y, 2))  # 0.04, 0.75
    assert plain < 0.5 and balanced > plain + 0.2


def test_imbalance_is_reported_and_weights_recorded(tiny_module, tmp_path):
    data = write_colour_images(tmp_path / "data", counts={"blue": 40, "green": 8, "red": 40})
    args = ["train", str(data), "-m", tiny_module, "--cache-dir", str(tmp_path / "cache"), "--epochs", "40",
            "--learning-rate", "0.05", "--quantize", "none"]
    result = CliRunner().invoke(main, args + ["-o", str(tmp_path / "balanced"), "--json", "--class-weight", "balanced"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    balance = trained["class_balance"]
    counts = {name: row["train"] for name, row in trained["split_per_class"].items()}
    assert balance["class_counts"] == counts
    assert balance["imbalance_ratio"] == pytest.approx(counts["blue"] / counts["green"], abs=1e-3)
    assert balance["class_weights"]["green"] == pytest.approx(sum(counts.values()) / (3 * counts["green"]), abs=1e-4)
    run = json.loads((tmp_path / "balanced" / "run.json").read_text())
    assert run["class_balance"] == balance and run["config"]["class_weight"] == "balanced"
    assert "class weights: balanced" in (tmp_path / "balanced" / "README.md").read_text()

    text = CliRunner().invoke(main, args + ["-o", str(tmp_path / "plain"), "-q"], catch_exceptions=False)
    assert text.exit_code == 0, text.output
    line = next(l for l in text.stdout.splitlines() if l.startswith("class balance:"))
    assert line == (f"class balance: {counts['green']}-{counts['blue']} training images per class, imbalance "
                    f"{balance['imbalance_ratio']:.2f} (blue / green); class weights: none (try --class-weight balanced)")
    assert "test recall per class: blue " in text.stdout


def test_unknown_class_weight_is_a_config_error():
    with pytest.raises(ConfigError, match="did you mean 'balanced'"):
        TrainConfig(class_weight="balance")
