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
        logits = vectors @ self.kernel + self.bias
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


def build_head_model(dim: int, n_classes: int, config: TrainConfig):
    import keras

    inputs = keras.Input(shape=(dim,), name="bottleneck")
    x = keras.layers.Dropout(config.dropout, name="dropout")(inputs) if config.dropout > 0 else inputs
    outputs = keras.layers.Dense(
        n_classes,
        activation="softmax",
        kernel_regularizer=keras.regularizers.L2(config.l2) if config.l2 > 0 else None,
        name="logits",
    )(x)
    return keras.Model(inputs, outputs, name="head")


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
    is never weighted, so the best epoch is chosen on the plain loss."""
    _tf()
    import keras

    keras.utils.set_random_seed(config.seed)
    model = build_head_model(train_x.shape[1], n_classes, config)
    steps = math.ceil(len(train_x) / config.batch_size)
    model.compile(
        optimizer=_optimizer(config),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=max(1, min(steps, 32)),
    )
    has_validation = val_x is not None and len(val_x) > 0
    monitor = _Monitor(config.epochs, config.patience if has_validation else 0)
    started = time.perf_counter()
    history = model.fit(
        train_x,
        keras.utils.to_categorical(train_y, n_classes),
        validation_data=(val_x, keras.utils.to_categorical(val_y, n_classes)) if has_validation else None,
        epochs=config.epochs,
        batch_size=config.batch_size,
        shuffle=True,
        class_weight=class_weights,
        verbose=0,
        callbacks=[monitor],
    ).history
    seconds = time.perf_counter() - started
    epochs_run = len(history["loss"])
    best_epoch = monitor.best_epoch if has_validation else epochs_run
    dense = model.get_layer("logits")
    kernel, bias = (w.numpy() if hasattr(w, "numpy") else np.asarray(w) for w in dense.weights)
    return Head(
        kernel=np.asarray(kernel, np.float32),
        bias=np.asarray(bias, np.float32),
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        history={k: [float(v) for v in vals] for k, vals in history.items()},
        seconds=seconds,
    )


class _Monitor:
    """Keras callback: one progress tick per epoch; with validation, early stopping on
    validation loss and the best epoch's weights restored at the end (Keras' own EarlyStopping
    restores them only when it stops early)."""

    def __new__(cls, epochs: int, patience: int):
        import keras

        class Monitor(keras.callbacks.Callback):
            best_epoch = 0

            def on_train_begin(self, logs=None):
                self.bar = progress.bar(total=epochs, desc="head", unit="epoch")
                self.best_loss, self.best_weights, self.wait = math.inf, None, 0

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                shown = {k: f"{logs[k]:.3f}" for k in ("loss", "val_accuracy") if k in logs}
                self.bar.set_postfix(shown, refresh=False)
                self.bar.update(1)
                if "val_loss" not in logs:
                    return
                if logs["val_loss"] < self.best_loss:
                    self.best_loss, self.best_epoch, self.wait = logs["val_loss"], epoch + 1, 0
                    self.best_weights = self.model.get_weights()
                else:
                    self.wait += 1
                    if patience and self.wait >= patience:
                        self.model.stop_training = True

            def on_train_end(self, logs=None):
                self.bar.close()
                if self.best_weights is not None:
                    self.model.set_weights(self.best_weights)

        return Monitor()
