"""The minibatch head on more vectors than its memory budget: streamed from disk in shuffled
buffers, as accurate as in memory, never holding all of them; and ``train`` streams when they
exceed the budget."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from retrain import progress
from retrain.config import TrainConfig
from retrain.features.vectors import StoredVectors, VectorStore
from retrain.training import head as head_module
from retrain.training.head import train_head_minibatch

N, DIM, CLASSES = 20_000, 128, 4
BUFFER = 256 * 1024  # 512 vectors of 128 dims: 1/40 of them


def blobs(n: int, seed: int, sort: bool):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(CLASSES, DIM)).astype(np.float32) * 0.25
    y = rng.integers(0, CLASSES, n)
    if sort:  # as a folder scan lists them: class by class, the hard case for shuffling by blocks
        y = np.sort(y)
    return centres[y] + rng.normal(size=(n, DIM)).astype(np.float32), y


def stored(x: np.ndarray, directory) -> StoredVectors:
    store = VectorStore(directory)
    store.add([str(i) for i in range(len(x))], x)
    return StoredVectors([(store, np.arange(len(x)))])


class CountingReads:
    """A streamed source that records how many vectors each read asked for, and which."""

    def __init__(self, source):
        self.source, self.shape, self.reads = source, source.shape, []

    def __len__(self):
        return len(self.source)

    def read(self, positions):
        self.reads.append(np.asarray(positions).copy())
        return self.source.read(positions)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    progress.set_enabled(False)
    folder = tmp_path_factory.mktemp("vectors")
    x, y = blobs(N, 1, sort=True)
    vx, vy = blobs(2_000, 2, sort=False)
    return x, y, vx, vy, stored(x, folder), stored(vx, folder)


def test_streamed_head_is_as_accurate_as_in_memory_and_reads_each_vector_once_per_epoch(data):
    x, y, vx, vy, source, val_source = data
    config = TrainConfig(epochs=6, patience=0)
    in_memory = train_head_minibatch(x, y, vx, vy, CLASSES, config)
    counting = CountingReads(source)
    streamed = train_head_minibatch(counting, y, val_source, vy, CLASSES, config, buffer_bytes=BUFFER)
    test_x, test_y = blobs(4_000, 3, sort=False)
    accuracy = [float((h.probabilities(test_x).argmax(1) == test_y).mean()) for h in (in_memory, streamed)]
    assert accuracy[0] > 0.8, accuracy  # the task is learnable, not trivial
    assert abs(accuracy[0] - accuracy[1]) <= 0.01, accuracy
    assert streamed.history["val_loss"][-1] == pytest.approx(in_memory.history["val_loss"][-1], abs=0.01)

    buffer_rows = BUFFER // (4 * DIM)
    assert max(len(r) for r in counting.reads) <= buffer_rows
    per_epoch = np.array_split(np.concatenate(counting.reads), config.epochs)
    for epoch in per_epoch:  # every vector once per epoch, in a new order each epoch
        np.testing.assert_array_equal(np.sort(epoch), np.arange(N))
    assert not np.array_equal(per_epoch[0], per_epoch[1])
    first_buffer = y[counting.reads[0]]
    assert len(np.unique(first_buffer)) == CLASSES  # a buffer mixes the classes, although they are stored in order


def test_streaming_never_holds_all_vectors(data):
    """Peak memory (tracemalloc: NumPy's allocations are traced) while training on streamed vectors
    stays a fraction of the vectors' size; the same training on the array holds them (the check can fail)."""
    x, y, _, _, source, _ = data
    config = TrainConfig(epochs=2, patience=0)
    train_head_minibatch(source, y, None, None, CLASSES, TrainConfig(epochs=1), buffer_bytes=BUFFER)  # TF started
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        train_head_minibatch(source, y, None, None, CLASSES, config, buffer_bytes=BUFFER)
        streamed_peak = tracemalloc.get_traced_memory()[1]
        copy = source.read(np.arange(N))
        tracemalloc.reset_peak()
        train_head_minibatch(copy, y, None, None, CLASSES, config)
        in_memory_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert streamed_peak < x.nbytes / 3, (streamed_peak, x.nbytes)
    assert in_memory_peak > x.nbytes, (in_memory_peak, x.nbytes)


def test_streamed_validation_gives_the_in_memory_loss_and_accuracy(data):
    _, _, vx, vy, _, val_source = data
    tf = head_module._tf()
    rng = np.random.default_rng(4)
    kernel = tf.Variable(rng.normal(size=(DIM, CLASSES)).astype(np.float32) * 0.1)
    bias = tf.Variable(rng.normal(size=CLASSES).astype(np.float32))
    config = TrainConfig()
    whole = head_module._validation_function(kernel, bias, vx, vy, CLASSES, config, BUFFER)()
    parts = head_module._validation_function(kernel, bias, val_source, vy, CLASSES, config, 16 * 1024)()
    assert float(parts[0]) == pytest.approx(float(whole[0]), rel=1e-5)
    assert float(parts[1]) == pytest.approx(float(whole[1]), abs=1e-6)  # the same count; theirs in float32


def test_stored_vectors_read_rows_of_several_stores_in_any_order(tmp_path):
    rng = np.random.default_rng(5)
    a, b = rng.random((300, 3), dtype=np.float32), rng.random((200, 3), dtype=np.float32)
    store_a, store_b = VectorStore(tmp_path), VectorStore(tmp_path)
    store_a.add([f"a{i}" for i in range(300)], a)
    store_b.add([f"b{i}" for i in range(200)], b)
    rows_a, rows_b = rng.permutation(300)[:120], rng.permutation(200)[:50]
    vectors = StoredVectors([(store_a, rows_a), (store_b, rows_b)])
    expected = np.concatenate([a[rows_a], b[rows_b]])
    assert vectors.shape == (170, 3) and len(vectors) == 170
    positions = rng.permutation(170)
    np.testing.assert_array_equal(vectors.read(positions), expected[positions])
    np.testing.assert_array_equal(store_a.read_rows(store_a.rows_of(["a7", "a3", "a299"])), a[[7, 3, 299]])
    with pytest.raises(IndexError):
        vectors.read([170])


def test_train_streams_the_head_vectors_above_the_budget(tiny_module, colour_dir, tmp_path, monkeypatch):
    import retrain
    from retrain import pipeline

    options = dict(head="minibatch", epochs=30, learning_rate=0.05, quantize=(), seed=3)
    kept = retrain.train(colour_dir, tiny_module, tmp_path / "kept", cache_dir=str(tmp_path / "cache"), **options)
    stacked = []
    real_arrays = pipeline.arrays
    monkeypatch.setattr(pipeline, "arrays", lambda images, *a: stacked.append(len(images)) or real_arrays(images, *a))
    monkeypatch.setattr(head_module, "IN_MEMORY_MAX_BYTES", 0)  # every set is over budget
    monkeypatch.setattr(head_module, "STREAM_BUFFER_BYTES", 8 * 4 * 64)  # 64 vectors of the tiny module's 8 dims
    streamed = retrain.train(colour_dir, tiny_module, tmp_path / "streamed", cache_dir=str(tmp_path / "cache"), **options)
    assert (kept.head["streamed"], streamed.head["streamed"]) == (False, True)
    assert streamed.head["training_vectors"] == kept.head["training_vectors"] == streamed.split["train"]
    assert streamed.split["train"] not in stacked  # the training vectors were never stacked into one array
    assert streamed.metrics["test"]["accuracy"] >= kept.metrics["test"]["accuracy"] - 0.2
    assert streamed.metrics["test"]["accuracy"] > 0.5  # three classes: above chance
