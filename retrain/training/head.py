"""The new classification head, trained on cached bottleneck vectors: a softmax layer.

Two ways to fit it, chosen by the number of vectors (``choose_solver``):

- **logistic** (up to ``FULL_BATCH_MAX_VECTORS``, ``training/logistic.py``): multinomial logistic
  regression solved to convergence with L-BFGS on all vectors at once (scikit-learn's
  ``LogisticRegression``), its L2 strength ``C`` chosen by stratified k-fold cross-validation on
  the training vectors, then refit on all of them: the linear-probe protocol for frozen features.
  The path over ``C`` stops once two Cs in a row are clearly worse than the best before them: it
  skips the slowest fits, and on every curve measured chose what the whole grid chose. It needs no
  validation split, converges whatever the data size (a fixed number of epochs is a number of
  optimizer steps that shrinks with the data), and gives every training image an out-of-fold
  prediction (likely label errors, cross-validated accuracy).
- **minibatch** (larger sets): Adam on shuffled batches, dropout before the layer, L2 on its kernel
  and label smoothing; validation after each epoch, stopping when validation loss has not improved
  for ``patience`` epochs and keeping the best epoch's weights. Epochs cost no module calls.
  Training vectors beyond ``IN_MEMORY_MAX_BYTES`` are streamed from disk in shuffled buffers
  (``train_head_minibatch``), so its memory does not grow with their number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import progress
from .._tf import tf as _tf
from ..config import TrainConfig
from .loop import EarlyStopping, make_optimizer


@dataclass
class Head:
    kernel: np.ndarray  # [dim, classes]
    bias: np.ndarray  # [classes]
    epochs_run: int | None  # minibatch only
    best_epoch: int | None  # 1-based; minibatch only
    history: dict  # minibatch: per-epoch lists (loss, accuracy, val_loss, val_accuracy); logistic: empty
    seconds: float
    solver: str = "minibatch"
    cross_validation: dict | None = None  # logistic: folds, C, accuracy per C, chosen C's figures
    out_of_fold: np.ndarray | None = None  # logistic: [n_images, classes] out-of-fold probabilities

    def record(self) -> dict:
        """What run.json and the JSON output say about the head."""
        data = {"solver": self.solver, "seconds": round(self.seconds, 3)}
        if self.solver == "minibatch":
            data.update(epochs_run=self.epochs_run, best_epoch=self.best_epoch)
        if self.cross_validation is not None:
            data["cross_validation"] = self.cross_validation
        return data

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


def class_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, np.int64), minlength=n_classes)


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """``n_images / (n_classes * count)`` per class, so every class weighs as much in the loss in
    total; the mean weight per image stays 1, so the learning rate keeps its meaning."""
    counts = class_counts(labels, n_classes)
    total = counts.sum()
    return {c: float(total / (n_classes * counts[c])) if counts[c] else 0.0 for c in range(n_classes)}


FULL_BATCH_MAX_VECTORS = 10_000  # above: the minibatch solver (measured: bench few-shot and head parts)


def choose_solver(requested: str, n_vectors: int) -> str:
    """``auto``: logistic up to FULL_BATCH_MAX_VECTORS vectors, minibatch above."""
    if requested != "auto":
        return requested
    return "logistic" if n_vectors <= FULL_BATCH_MAX_VECTORS else "minibatch"


def fit_head(train_x, train_y, val_x, val_y, n_classes: int, config: TrainConfig,
             class_weights: dict[int, float] | None = None, groups: np.ndarray | None = None) -> Head:
    """Fit the head with the solver ``choose_solver`` picks for ``config.head`` and the data size.

    ``groups`` (one id per training vector) keeps vectors of one image (its augmented copies)
    in one fold; out-of-fold figures count each image's first vector only."""
    from .logistic import fit_logistic_cv  # here: logistic.py builds its Head from this module

    solver = choose_solver(config.head, len(train_x))
    if solver == "minibatch":
        return train_head_minibatch(train_x, train_y, val_x, val_y, n_classes, config, class_weights)
    # The full-batch solver needs every vector at once (up to FULL_BATCH_MAX_VECTORS by default).
    return fit_logistic_cv(in_memory(train_x), train_y, n_classes, config, class_weights, groups)


IN_MEMORY_MAX_BYTES = 1 << 30  # training vectors up to 1 GiB (about 210k of 1,280 dims) are held in memory; above, streamed
STREAM_BUFFER_BYTES = 64 << 20  # streamed vectors shuffled together: what training holds (twice: one buffer read ahead)
STREAM_BLOCK_BYTES = 1 << 20  # consecutive vectors read together when streaming: shuffling is by block, then in the buffer


def is_streamed(vectors) -> bool:
    """Vectors read a piece at a time (``shape`` and ``read(positions)``, e.g. vectors.StoredVectors)
    rather than an array."""
    return not isinstance(vectors, np.ndarray) and callable(getattr(vectors, "read", None))


def should_stream(n_vectors: int, dim: int, budget: int | None = None) -> bool:
    """Whether ``n_vectors`` float32 vectors of ``dim`` exceed the memory budget for training vectors
    (``IN_MEMORY_MAX_BYTES`` unless given)."""
    return n_vectors * dim * 4 > (IN_MEMORY_MAX_BYTES if budget is None else budget)


def in_memory(vectors) -> np.ndarray:
    """An array of ``vectors``; streamed ones are read whole (for what needs them all at once)."""
    return vectors.read(np.arange(len(vectors))) if is_streamed(vectors) else vectors


def train_head_minibatch(
    train_x,
    train_y: np.ndarray,
    val_x,
    val_y: np.ndarray | None,
    n_classes: int,
    config: TrainConfig,
    class_weights: dict[int, float] | None = None,
    buffer_bytes: int | None = None,
) -> Head:
    """Fit the head; returns its best weights (by validation loss when there is validation data).

    ``class_weights`` (class index -> weight) scale each training image's loss; validation loss
    is never weighted, so the best epoch is chosen on the plain loss.

    Each epoch is one call of a traced function that loops over the shuffled batches in the
    graph: the cost per epoch is the arithmetic, not a framework's per-epoch set-up.

    ``train_x`` and ``val_x`` may also be streamed vectors (``is_streamed``): training then reads
    ``buffer_bytes`` (default ``STREAM_BUFFER_BYTES``) of them at a time, in shuffled blocks, one
    buffer ahead on another thread, so memory holds two buffers whatever the number of vectors
    (see ``_streamed_epoch_function``); validation reads them in order, a buffer at a time."""
    tf = _tf()
    import keras

    keras.utils.set_random_seed(config.seed)
    dim = int(train_x.shape[1])
    buffer_bytes = STREAM_BUFFER_BYTES if buffer_bytes is None else buffer_bytes
    kernel = tf.Variable(keras.initializers.GlorotUniform(seed=config.seed)((dim, n_classes)), name="head_kernel")
    bias = tf.Variable(tf.zeros([n_classes]), name="head_bias")
    epoch_function = _streamed_epoch_function if is_streamed(train_x) else _epoch_function
    run_epoch = epoch_function(kernel, bias, train_x, train_y, n_classes, config, class_weights, buffer_bytes)
    validate = _validation_function(kernel, bias, val_x, val_y, n_classes, config, buffer_bytes)
    stopping = EarlyStopping([kernel, bias], config.patience if validate else 0)
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    if validate:
        history.update(val_loss=[], val_accuracy=[])
    started = time.perf_counter()
    with progress.bar(total=config.epochs, desc="head", unit="epoch") as bar:
        for epoch in range(1, config.epochs + 1):
            loss, accuracy = run_epoch(epoch)
            history["loss"].append(float(loss))
            history["accuracy"].append(float(accuracy))
            shown = {"loss": f"{float(loss):.3f}"}
            if validate:
                val_loss, val_accuracy = (float(v) for v in validate())
                history["val_loss"].append(val_loss)
                history["val_accuracy"].append(val_accuracy)
                shown["val_accuracy"] = f"{val_accuracy:.3f}"
                stopping.update(epoch, val_loss)
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if stopping.stop:
                break
    if validate:
        stopping.restore()  # the best epoch's weights
    epochs_run = len(history["loss"])
    return Head(kernel=np.asarray(kernel.numpy(), np.float32), bias=np.asarray(bias.numpy(), np.float32),
                epochs_run=epochs_run, best_epoch=stopping.best_epoch if validate else epochs_run, history=history,
                seconds=time.perf_counter() - started)


def _train_step(kernel, bias, n_classes: int, config: TrainConfig, class_weights):
    """``step(features, labels, weights, seed) -> (loss, correct)`` for one batch, the optimizer
    applied: what both epoch functions run per batch (traced inside them)."""
    tf = _tf()
    variables = [kernel, bias]
    optimizer = make_optimizer(config, config.learning_rate)
    optimizer.build(variables)
    dropout, l2, smoothing = config.dropout, config.l2, config.label_smoothing

    def step(features, labels, weights, seed):
        if dropout > 0:
            features = tf.nn.experimental.stateless_dropout(features, dropout, seed)
        with tf.GradientTape() as tape:
            logits = tf.matmul(features, kernel) + bias
            # As Keras weighs with class_weight: the weighted sum over the batch size.
            loss = tf.reduce_mean(head_losses(labels, logits, n_classes, smoothing) * weights)
            loss += l2 * tf.reduce_sum(tf.square(kernel))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == labels, tf.int32))

    return step


def _class_weight_table(n_classes: int, class_weights) -> np.ndarray:
    return np.ones(n_classes, np.float32) if class_weights is None else np.asarray(
        [class_weights.get(c, 1.0) for c in range(n_classes)], np.float32)


def _epoch_function(kernel, bias, train_x, train_y, n_classes: int, config: TrainConfig, class_weights,
                    buffer_bytes=None):  # buffer_bytes: streamed vectors only
    """One traced epoch over the shuffled batches of in-memory vectors: ``run_epoch(epoch) -> (loss, accuracy)``."""
    tf = _tf()
    step = _train_step(kernel, bias, n_classes, config, class_weights)
    x = tf.constant(np.asarray(train_x, np.float32))
    y = tf.constant(np.asarray(train_y, np.int64))
    w = tf.gather(tf.constant(_class_weight_table(n_classes, class_weights)), y)
    n, batch = len(train_x), config.batch_size
    rng = np.random.default_rng(config.seed)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([2], tf.int64)])
    def traced(order, seed):
        loss_sum, correct = tf.constant(0.0), tf.constant(0)
        for start in tf.range(0, n, batch, dtype=tf.int64):
            chosen = order[start : start + batch]
            loss, right = step(tf.gather(x, chosen), tf.gather(y, chosen), tf.gather(w, chosen), seed + tf.stack([0, start]))
            loss_sum += loss * tf.cast(tf.shape(chosen)[0], tf.float32)
            correct += right
        return loss_sum / n, tf.cast(correct, tf.float32) / n

    def run_epoch(epoch: int):
        return traced(tf.constant(rng.permutation(n)), tf.constant([config.seed, epoch], tf.int64))

    return run_epoch


def _streamed_epoch_function(kernel, bias, source, train_y, n_classes: int, config: TrainConfig, class_weights,
                             buffer_bytes: int):
    """Epochs over streamed vectors: ``run_epoch(epoch) -> (loss, accuracy)``.

    Each epoch the vectors are cut into blocks of consecutive ones (about ``STREAM_BLOCK_BYTES``, a
    whole number of batches), the blocks are shuffled, and each buffer of ``buffer_bytes`` gathers
    blocks from all over the data, read in shuffled order; a traced function then runs the
    buffer's batches as the in-memory epoch does. The next buffer is read while one trains."""
    from concurrent.futures import ThreadPoolExecutor

    tf = _tf()
    step = _train_step(kernel, bias, n_classes, config, class_weights)
    table = tf.constant(_class_weight_table(n_classes, class_weights))
    labels = np.asarray(train_y, np.int64)
    n, dim = int(source.shape[0]), int(source.shape[1])
    batch = config.batch_size
    # Blocks of whole batches, at most a sixteenth of a buffer (each buffer mixes 16 places or more).
    buffer_rows = max(batch, buffer_bytes // (4 * dim))
    block = max(1, min(STREAM_BLOCK_BYTES // (4 * dim), buffer_rows // 16) // batch) * batch
    blocks_per_buffer = max(1, buffer_rows // block)
    rng = np.random.default_rng(config.seed)

    @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32), tf.TensorSpec([None], tf.int64),
                                  tf.TensorSpec([None], tf.int64), tf.TensorSpec([2], tf.int64)])
    def run_buffer(x, y, order, seed):
        loss_sum, correct = tf.constant(0.0), tf.constant(0)
        w = tf.gather(table, y)
        for start in tf.range(0, tf.shape(order, out_type=tf.int64)[0], batch, dtype=tf.int64):
            chosen = order[start : start + batch]
            loss, right = step(tf.gather(x, chosen), tf.gather(y, chosen), tf.gather(w, chosen), seed + tf.stack([0, start]))
            loss_sum += loss * tf.cast(tf.shape(chosen)[0], tf.float32)
            correct += right
        return loss_sum, correct

    def load(positions):
        return source.read(positions), labels[positions]

    def run_epoch(epoch: int):
        order = rng.permutation(-(-n // block))
        buffers = []  # per buffer: its positions, in order (read so), and the order its batches take them in
        for first in range(0, len(order), blocks_per_buffer):
            chosen = np.sort(order[first:first + blocks_per_buffer])
            rows = np.concatenate([np.arange(b * block, min((b + 1) * block, n)) for b in chosen])
            buffers.append((rows, rng.permutation(len(rows))))
        loss_sum, correct, done = 0.0, 0, 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-reader") as reader:
            reading = reader.submit(load, buffers[0][0])
            for number in range(len(buffers)):
                x, y = reading.result()
                if number + 1 < len(buffers):
                    reading = reader.submit(load, buffers[number + 1][0])
                part_loss, part_correct = run_buffer(x, y, tf.constant(buffers[number][1]),
                                                     tf.constant([config.seed, (epoch - 1) * n + done], tf.int64))
                loss_sum += float(part_loss)
                correct += int(part_correct)
                done += len(y)
                del x, y
        return loss_sum / n, correct / n

    return run_epoch


def _validation_function(kernel, bias, val_x, val_y, n_classes: int, config: TrainConfig, buffer_bytes: int):
    """``validate() -> (loss, accuracy)`` on the validation vectors, or None without any."""
    if val_x is None or not len(val_x):
        return None
    tf = _tf()
    if is_streamed(val_x):
        return _streamed_validation(kernel, bias, val_x, val_y, n_classes, config, buffer_bytes)
    vx, vy = tf.constant(np.asarray(val_x, np.float32)), tf.constant(np.asarray(val_y, np.int64))

    @tf.function(autograph=False)
    def validate():
        logits = tf.matmul(vx, kernel) + bias
        loss = tf.reduce_mean(head_losses(vy, logits, n_classes, config.label_smoothing))
        loss += config.l2 * tf.reduce_sum(tf.square(kernel))
        return loss, tf.reduce_mean(tf.cast(tf.argmax(logits, 1) == vy, tf.float32))

    return validate


def _streamed_validation(kernel, bias, source, val_y, n_classes: int, config: TrainConfig, buffer_bytes: int):
    """``validate()`` over streamed validation vectors, read in order a buffer at a time: the same
    loss (mean cross-entropy plus the L2 term) and accuracy as on an array of them."""
    tf = _tf()
    n, dim = int(source.shape[0]), int(source.shape[1])
    labels = np.asarray(val_y, np.int64)
    rows = max(1, buffer_bytes // (4 * dim))

    @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32), tf.TensorSpec([None], tf.int64)],
                 autograph=False)
    def part(x, y):
        logits = tf.matmul(x, kernel) + bias
        return (tf.reduce_sum(head_losses(y, logits, n_classes, config.label_smoothing)),
                tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == y, tf.int32)))

    def validate():
        loss_sum, correct = 0.0, 0
        for start in range(0, n, rows):
            positions = np.arange(start, min(start + rows, n))
            part_loss, part_correct = part(source.read(positions), labels[positions])
            loss_sum += float(part_loss)
            correct += int(part_correct)
        penalty = config.l2 * float(tf.reduce_sum(tf.square(kernel)))
        return loss_sum / n + penalty, correct / n

    return validate
