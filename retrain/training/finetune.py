"""Stage 2 of ``--fine-tune``: the module's own weights, trained together with the head.

Stage 1 (``head.train_head_minibatch`` on cached bottlenecks) gives a good head in seconds; starting from
it, the whole network is trained on decoded images with a learning rate about 10x lower, so the
pre-trained weights are adjusted rather than ruined. The module is called in inference mode
(``training=False``), so its batch-norm statistics stay frozen: small batches of a new data set
would otherwise replace statistics gathered on millions of images. Only the variables the module
lists as ``trainable_variables`` (the reusable SavedModel convention) are trained.

Validation runs before the first step (the frozen module with the stage-1 head) and after each
epoch. An epoch counts as better only when validation loss is lower *and* validation accuracy is
not below the frozen start, and the best state is kept; when no epoch is better the frozen
weights are restored, so fine-tuning never makes the model worse on validation.

The bottleneck cache never sees the changed weights: its vectors are all computed before stage 2.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from .. import progress
from .._tf import tf as _tf
from ..config import TrainConfig
from ..errors import ConfigError, ModuleError
from ..evaluation.evaluate import wilson_interval
from .head import head_losses
from .loop import EarlyStopping, make_optimizer
from ..data.images import iter_image_batches, to_module_input


@dataclass
class FineTuneResult:
    kernel: np.ndarray  # head of the kept state
    bias: np.ndarray
    kept: str  # "fine_tuned" or "frozen"
    epochs_run: int
    best_epoch: int  # 0: no epoch beat the frozen start
    learning_rate: float
    frozen_validation: dict  # {"loss", "accuracy"} of the stage-1 head on the unchanged module
    best_validation: dict  # the kept state's
    history: list[dict]  # per epoch: loss, val_loss, val_accuracy, seconds
    seconds: float
    weights_fingerprint: str  # of the module's weights as exported
    original_weights_fingerprint: str
    validation_labels: np.ndarray = field(repr=False, default=None)
    validation_probabilities: np.ndarray = field(repr=False, default=None)  # of the kept state

    @property
    def weights_changed(self) -> bool:
        return self.kept == "fine_tuned"

    def to_dict(self) -> dict:
        return {
            "kept": self.kept,
            "weights_changed": self.weights_changed,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "learning_rate": self.learning_rate,
            "frozen_validation": self.frozen_validation,
            "best_validation": self.best_validation,
            "history": self.history,
            "seconds": round(self.seconds, 3),
            "weights_fingerprint": self.weights_fingerprint,
            "original_weights_fingerprint": self.original_weights_fingerprint,
        }


def trainable_module_variables(module) -> list:
    """The variables the module offers for training; a clear error when there are none."""
    variables = list(getattr(module.obj, "trainable_variables", None) or [])
    if not variables:
        raise ModuleError(
            f"module {module.info.handle} has no trainable variables, so it cannot be fine-tuned: "
            "train without --fine-tune (the head alone)"
        )
    return variables


def module_variables(module) -> list:
    return list(getattr(module.obj, "variables", None) or getattr(module.obj, "trainable_variables", None) or [])


def weights_fingerprint(module) -> str:
    """SHA-256 over the module's variables (name, dtype, shape, values) in the module's own order."""
    digest = hashlib.sha256()
    for variable in module_variables(module):
        value = np.ascontiguousarray(variable.numpy())
        digest.update(f"{variable.name}|{value.dtype.str}|{value.shape}".encode() + b"\0")
        digest.update(value.tobytes())
    return digest.hexdigest()


def fine_tune(module, kernel: np.ndarray, bias: np.ndarray, train_images, val_images, n_classes: int,
              config: TrainConfig, class_weights: dict[int, float] | None = None, augmentation=None,
              replicas=None) -> FineTuneResult:
    """Train the module's trainable variables and the head (from ``kernel``, ``bias``) on the
    images (dataset.ImageFile). The module object is changed in place to the kept state, so an
    export made from it afterwards serves the fine-tuned weights.

    ``replicas`` (distribute.Replicas, several devices): ``replicas.module``, the mirrored copy,
    is trained under the strategy, batches of ``fine_tune_batch_size`` per replica, and the kept
    state is copied into ``module`` at the end."""
    import keras

    module_vars = trainable_module_variables(module)
    if not val_images:
        raise ConfigError("--fine-tune needs validation images to keep only improvements: use --validation-percent above 0 or --validation-dir")
    keras.utils.set_random_seed(config.seed)
    if replicas is None:
        steps = _Steps(module, module_vars, kernel, bias, n_classes, config, class_weights)
    else:
        steps = _MirroredSteps(replicas, trainable_module_variables(replicas.module), kernel, bias, n_classes,
                               config, class_weights)
    original_fingerprint = weights_fingerprint(module)
    started = time.perf_counter()
    frozen, val_labels, best_probabilities = steps.validate(val_images)
    best = frozen
    stopping = EarlyStopping(steps.trained, config.fine_tune_patience, best_loss=frozen["loss"])
    history: list[dict] = []
    with progress.bar(total=config.fine_tune_epochs * len(train_images), desc="fine-tune", unit="img") as bar:
        for epoch in range(1, config.fine_tune_epochs + 1):
            epoch_started = time.perf_counter()
            loss = steps.train_epoch(train_images, epoch, augmentation, bar)
            figures, labels, probabilities = steps.validate(val_images)
            # Better only when validation loss is lower and accuracy not below the frozen start.
            better = stopping.update(epoch, figures["loss"],
                                     figures["loss"] < stopping.best_loss and figures["accuracy"] >= frozen["accuracy"])
            history.append({"epoch": epoch, "loss": loss, "val_loss": figures["loss"],
                            "val_accuracy": figures["accuracy"], "improved": better,
                            "seconds": round(time.perf_counter() - epoch_started, 3)})
            if better:
                best, val_labels, best_probabilities = figures, labels, probabilities
            if stopping.stop:
                break
    stopping.restore()  # the best epoch, or the frozen start when none beat it
    if replicas is not None:
        from ..distribute import copy_trained_weights

        copy_trained_weights(replicas.module, module)
    return FineTuneResult(
        kernel=steps.head_kernel.numpy(),
        bias=steps.head_bias.numpy(),
        kept="fine_tuned" if stopping.best_state is not None else "frozen",
        epochs_run=len(history),
        best_epoch=stopping.best_epoch,
        learning_rate=config.resolved_fine_tune_learning_rate,
        frozen_validation=frozen,
        best_validation=best,
        history=history,
        seconds=time.perf_counter() - started,
        weights_fingerprint=weights_fingerprint(module),
        original_weights_fingerprint=original_fingerprint,
        validation_labels=val_labels,
        validation_probabilities=best_probabilities,
    )


class _Steps:
    """The traced training and evaluation steps of module + head, and one epoch of each."""

    def __init__(self, module, module_vars, kernel, bias, n_classes: int, config: TrainConfig, class_weights):
        tf = _tf()
        self.module, self.config, self.spec = module, config, module.info.input_spec
        self.train_batch = config.fine_tune_batch_size
        self.eval_batch = config.batch_for_images(self.spec.height, self.spec.width)
        self.head_kernel = tf.Variable(np.asarray(kernel, np.float32), name="head_kernel")
        self.head_bias = tf.Variable(np.asarray(bias, np.float32), name="head_bias")
        self.trained = module_vars + [self.head_kernel, self.head_bias]
        optimizer = make_optimizer(config, config.resolved_fine_tune_learning_rate)
        regularizers = list(getattr(module.obj, "regularization_losses", None) or [])
        weights = [1.0] * n_classes if class_weights is None else [class_weights.get(c, 1.0) for c in range(n_classes)]
        weight_table = tf.constant(weights, tf.float32)
        smoothing, dropout, l2 = config.label_smoothing, config.dropout, config.l2
        image_spec = tf.TensorSpec([None, self.spec.height, self.spec.width, 3], tf.uint8)
        trained, head_kernel, head_bias, spec = self.trained, self.head_kernel, self.head_bias, self.spec

        def logits_of(pixels, dropout_seed=None):
            features = module.features(to_module_input(pixels, spec.value_range))  # inference mode: BN frozen
            if dropout_seed is not None and dropout > 0:
                features = tf.nn.experimental.stateless_dropout(features, dropout, dropout_seed)
            return tf.matmul(features, head_kernel) + head_bias

        @tf.function(input_signature=[image_spec, tf.TensorSpec([None], tf.int64), tf.TensorSpec([2], tf.int64)])
        def train_step(pixels, labels, seed):
            with tf.GradientTape() as tape:
                # As Keras weighs with class_weight: the weighted sum over the batch size.
                losses = head_losses(labels, logits_of(pixels, seed), n_classes, smoothing)
                loss = tf.reduce_mean(losses * tf.gather(weight_table, labels))
                total = loss + l2 * tf.reduce_sum(tf.square(head_kernel))
                for regularizer in regularizers:
                    total += regularizer()
            gradients = tape.gradient(total, trained)
            optimizer.apply_gradients([(g, v) for g, v in zip(gradients, trained) if g is not None])
            return loss

        @tf.function(input_signature=[image_spec, tf.TensorSpec([None], tf.int64)], autograph=False)
        def eval_step(pixels, labels):
            logits = logits_of(pixels)
            return tf.nn.softmax(logits), head_losses(labels, logits, n_classes, smoothing)

        self.train_step, self.eval_step = train_step, eval_step

    def train_epoch(self, images, epoch: int, augmentation, bar) -> float:
        """One shuffled pass (augmented when asked); returns the mean training loss."""
        from ..data.augment import augment_pixels

        tf, config, spec = _tf(), self.config, self.spec
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(len(images))
        chosen = [images[i] for i in order]
        labels_all = np.asarray([i.label for i in images], np.int64)
        total_loss, seen = 0.0, 0
        for indices, pixels, skipped in iter_image_batches([i.path for i in chosen], [i.decoder for i in chosen],
                                                            spec.height, spec.width, self.train_batch):
            if pixels is not None and len(indices):
                if augmentation is not None:
                    pixels = augment_pixels(pixels, augmentation.draw(rng, len(pixels)))
                seed = rng.integers(0, 2**31 - 1, size=2)
                loss = self.train_step(tf.constant(pixels), tf.constant(labels_all[order[indices]]),
                                       tf.constant(seed, tf.int64))
                total_loss += float(loss) * len(indices)
                seen += len(indices)
            bar.update(len(indices) + len(skipped))
            bar.set_postfix({"epoch": epoch, "loss": f"{total_loss / max(seen, 1):.3f}"}, refresh=False)
        return total_loss / max(seen, 1)

    def validate(self, images) -> tuple[dict, np.ndarray, np.ndarray]:
        """Loss, accuracy (with count and interval) on the validation images; their labels and probabilities."""
        tf, spec = _tf(), self.spec
        labels_all = np.asarray([i.label for i in images], np.int64)
        labels, probabilities, losses = [], [], []
        for indices, pixels, _ in iter_image_batches([i.path for i in images], [i.decoder for i in images],
                                                      spec.height, spec.width, self.eval_batch):
            if pixels is None or not len(indices):
                continue
            p, l = self.eval_step(tf.constant(pixels), tf.constant(labels_all[indices]))
            labels.append(labels_all[indices])
            probabilities.append(p.numpy())
            losses.append(l.numpy())
        labels, probabilities = np.concatenate(labels), np.concatenate(probabilities)
        correct = int((probabilities.argmax(1) == labels).sum())
        figures = {"loss": float(np.concatenate(losses).mean()), "accuracy": correct / len(labels),
                   "n_images": int(len(labels)), "accuracy_interval": wilson_interval(correct, len(labels))}
        return figures, labels, probabilities


class _MirroredSteps(_Steps):
    """``_Steps`` over several replicas (distribute.Replicas): the same loss and update, each
    batch split into one slice per replica.

    The head's variables and the optimizer are made in the strategy's scope (the module's were
    loaded there), so each is mirrored. Each replica sums its images' weighted losses over the
    whole batch's size, and the penalties are divided by the number of replicas, so the
    optimizer's all-reduced sum of the replicas' gradients is the gradient of the one-device loss
    of the whole batch. Dropout draws the one-device mask of the whole batch (same seed, same
    shape) and each replica takes its own rows, so the same image gets the same mask either way.
    What differs from one device is the order of float sums: measured in tests/test_distribute.py."""

    def __init__(self, replicas, module_vars, kernel, bias, n_classes: int, config: TrainConfig, class_weights):
        tf = _tf()
        module, strategy = replicas.module, replicas.strategy
        self.module, self.config, self.spec = module, config, module.info.input_spec
        self.train_batch = config.fine_tune_batch_size * replicas.count
        self.eval_batch = config.batch_for_images(self.spec.height, self.spec.width) * replicas.count
        with strategy.scope():
            self.head_kernel = tf.Variable(np.asarray(kernel, np.float32), name="head_kernel")
            self.head_bias = tf.Variable(np.asarray(bias, np.float32), name="head_bias")
            self.trained = module_vars + [self.head_kernel, self.head_bias]
            optimizer = make_optimizer(config, config.resolved_fine_tune_learning_rate)
            optimizer.build(self.trained)  # its slots made here, mirrored, not inside a replica's step
        regularizers = list(getattr(module.obj, "regularization_losses", None) or [])
        weights = [1.0] * n_classes if class_weights is None else [class_weights.get(c, 1.0) for c in range(n_classes)]
        weight_table = tf.constant(weights, tf.float32)
        smoothing, dropout, l2, count = config.label_smoothing, config.dropout, config.l2, float(replicas.count)
        trained, head_kernel, head_bias, spec = self.trained, self.head_kernel, self.head_bias, self.spec

        def logits_of(pixels):
            features = module.features(to_module_input(pixels, spec.value_range))  # inference mode: BN frozen
            return features, tf.matmul(features, head_kernel) + head_bias

        def replica_train(pixels, labels, offset, total, seed):
            # Rows from ``total`` on are padding (Replicas.split): no loss, no mask drawn for them.
            with tf.GradientTape() as tape:
                features, _ = logits_of(pixels)
                rows, dim = tf.shape(features, tf.int64)[0], tf.shape(features, tf.int64)[1]
                if dropout > 0:
                    whole = tf.nn.experimental.stateless_dropout(tf.ones([total, dim]), dropout, seed)
                    whole = tf.concat([whole, tf.ones([tf.maximum(offset + rows - total, 0), dim])], axis=0)
                    features = features * whole[offset:offset + rows]
                logits = tf.matmul(features, head_kernel) + head_bias
                losses = head_losses(labels, logits, n_classes, smoothing)
                present = tf.cast(offset + tf.range(rows) < total, tf.float32)
                loss = tf.reduce_sum(losses * tf.gather(weight_table, labels) * present) / tf.cast(total, tf.float32)
                penalty = l2 * tf.reduce_sum(tf.square(head_kernel))
                for regularizer in regularizers:
                    penalty += regularizer()
                objective = loss + penalty / count
            gradients = tape.gradient(objective, trained)
            optimizer.apply_gradients([(g, v) for g, v in zip(gradients, trained) if g is not None])
            return loss

        @tf.function(reduce_retracing=True, autograph=False)
        def distributed_train(pixels, labels, offsets, total, seed):
            losses = strategy.run(replica_train, args=(pixels, labels, offsets, total, seed))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

        def replica_eval(pixels, labels):
            _, logits = logits_of(pixels)
            return tf.nn.softmax(logits), head_losses(labels, logits, n_classes, smoothing)

        @tf.function(reduce_retracing=True, autograph=False)
        def distributed_eval(pixels, labels, n):
            probabilities, losses = strategy.run(replica_eval, args=(pixels, labels))
            with tf.device("/cpu:0"):  # padding rows dropped
                return (tf.concat(replicas.local(probabilities), axis=0)[:n],
                        tf.concat(replicas.local(losses), axis=0)[:n])

        def train_step(pixels, labels, seed):  # what _Steps.train_epoch calls
            parts, label_parts, offsets = replicas.split(pixels, labels)
            return distributed_train(parts, label_parts, offsets, tf.constant(len(pixels), tf.int64), seed)

        def eval_step(pixels, labels):
            parts, label_parts, _ = replicas.split(pixels, labels)
            return distributed_eval(parts, label_parts, tf.constant(len(pixels), tf.int32))

        self.train_step, self.eval_step = train_step, eval_step


__all__ = ["FineTuneResult", "fine_tune", "trainable_module_variables", "weights_fingerprint"]
