"""The new classification head, trained on cached bottleneck vectors.

A softmax layer with dropout before it, L2 on its kernel and label smoothing in the loss.
Validation after each epoch; training stops when validation loss has not improved for
``patience`` epochs and the best epoch's weights are kept. Epochs cost no module calls.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from . import progress
from ._tf import tf as _tf
from .config import TrainConfig


@dataclass
class Head:
    kernel: np.ndarray  # [dim, classes]
    bias: np.ndarray  # [classes]
    epochs_run: int
    best_epoch: int  # 1-based
    history: dict  # per-epoch lists: loss, accuracy, val_loss, val_accuracy
    seconds: float

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        return self.probabilities_of(vectors, self.kernel, self.bias)

    @staticmethod
    def probabilities_of(vectors: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """Softmax of the head's logits, in float32 as the serving graph computes it."""
        logits = np.asarray(vectors, np.float32) @ np.asarray(kernel, np.float32) + np.asarray(bias, np.float32)
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


def head_losses(labels, logits, n_classes: int, smoothing: float):
    """Per-image cross-entropy with label smoothing: the head's loss, in both training stages."""
    tf = _tf()
    target = tf.one_hot(labels, n_classes) * (1.0 - smoothing) + smoothing / n_classes
    return tf.nn.softmax_cross_entropy_with_logits(target, logits)


def _optimizer(config: TrainConfig):
    import keras

    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=config.momentum)
    return keras.optimizers.Adam(learning_rate=config.learning_rate)


def class_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, np.int64), minlength=n_classes)


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """``n_images / (n_classes * count)`` per class, so every class weighs as much in the loss in
    total; the mean weight per image stays 1, so the learning rate keeps its meaning."""
    counts = class_counts(labels, n_classes)
    total = counts.sum()
    return {c: float(total / (n_classes * counts[c])) if counts[c] else 0.0 for c in range(n_classes)}


def train_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray | None,
    val_y: np.ndarray | None,
    n_classes: int,
    config: TrainConfig,
    class_weights: dict[int, float] | None = None,
) -> Head:
    """Fit the head; returns its best weights (by validation loss when there is validation data).

    ``class_weights`` (class index -> weight) scale each training image's loss; validation loss
    is never weighted, so the best epoch is chosen on the plain loss.

    Each epoch is one call of a traced function that loops over the shuffled batches in the
    graph: the cost per epoch is the arithmetic, not a framework's per-epoch set-up."""
    tf = _tf()
    import keras

    keras.utils.set_random_seed(config.seed)
    dim = int(train_x.shape[1])
    kernel = tf.Variable(keras.initializers.GlorotUniform(seed=config.seed)((dim, n_classes)), name="head_kernel")
    bias = tf.Variable(tf.zeros([n_classes]), name="head_bias")
    variables = [kernel, bias]
    optimizer = _optimizer(config)
    optimizer.build(variables)
    weights = np.ones(n_classes, np.float32) if class_weights is None else np.asarray(
        [class_weights.get(c, 1.0) for c in range(n_classes)], np.float32)
    x = tf.constant(np.asarray(train_x, np.float32))
    y = tf.constant(np.asarray(train_y, np.int64))
    w = tf.gather(tf.constant(weights), y)
    n, batch = len(train_x), config.batch_size
    dropout, l2, smoothing = config.dropout, config.l2, config.label_smoothing

    def regularization():
        return l2 * tf.reduce_sum(tf.square(kernel))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([2], tf.int64)])
    def run_epoch(order, seed):
        loss_sum, correct = tf.constant(0.0), tf.constant(0)
        for start in tf.range(0, n, batch, dtype=tf.int64):
            chosen = order[start : start + batch]
            features, labels = tf.gather(x, chosen), tf.gather(y, chosen)
            if dropout > 0:
                features = tf.nn.experimental.stateless_dropout(features, dropout, seed + tf.stack([0, start]))
            with tf.GradientTape() as tape:
                logits = tf.matmul(features, kernel) + bias
                # As Keras weighs with class_weight: the weighted sum over the batch size.
                loss = tf.reduce_mean(head_losses(labels, logits, n_classes, smoothing) * tf.gather(w, chosen))
                loss += regularization()
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            size = tf.shape(chosen)[0]
            loss_sum += loss * tf.cast(size, tf.float32)
            correct += tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == labels, tf.int32))
        return loss_sum / n, tf.cast(correct, tf.float32) / n

    has_validation = val_x is not None and len(val_x) > 0
    if has_validation:
        vx, vy = tf.constant(np.asarray(val_x, np.float32)), tf.constant(np.asarray(val_y, np.int64))

        @tf.function(autograph=False)
        def validate():
            logits = tf.matmul(vx, kernel) + bias
            loss = tf.reduce_mean(head_losses(vy, logits, n_classes, smoothing)) + regularization()
            return loss, tf.reduce_mean(tf.cast(tf.argmax(logits, 1) == vy, tf.float32))

    patience = config.patience if has_validation else 0
    rng = np.random.default_rng(config.seed)
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    if has_validation:
        history.update(val_loss=[], val_accuracy=[])
    best_loss, best_epoch, best_weights, wait = math.inf, 0, None, 0
    started = time.perf_counter()
    with progress.bar(total=config.epochs, desc="head", unit="epoch") as bar:
        for epoch in range(1, config.epochs + 1):
            loss, accuracy = run_epoch(tf.constant(rng.permutation(n)), tf.constant([config.seed, epoch], tf.int64))
            history["loss"].append(float(loss))
            history["accuracy"].append(float(accuracy))
            shown = {"loss": f"{float(loss):.3f}"}
            if has_validation:
                val_loss, val_accuracy = (float(v) for v in validate())
                history["val_loss"].append(val_loss)
                history["val_accuracy"].append(val_accuracy)
                shown["val_accuracy"] = f"{val_accuracy:.3f}"
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if not has_validation:
                continue
            if val_loss < best_loss:
                best_loss, best_epoch, wait = val_loss, epoch, 0
                best_weights = (kernel.numpy(), bias.numpy())
            else:
                wait += 1
                if patience and wait >= patience:
                    break
    seconds = time.perf_counter() - started
    epochs_run = len(history["loss"])
    final = best_weights if best_weights is not None else (kernel.numpy(), bias.numpy())
    return Head(
        kernel=np.asarray(final[0], np.float32),
        bias=np.asarray(final[1], np.float32),
        epochs_run=epochs_run,
        best_epoch=best_epoch if has_validation else epochs_run,
        history=history,
        seconds=seconds,
    )
