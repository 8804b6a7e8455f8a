"""The bottleneck cache: hits, atomic shards, corruption detected and recomputed."""

import numpy as np
import pytest

from retrain.features.bottlenecks import BottleneckCache, extract_bottlenecks
from retrain.data.dataset import scan_folder
from retrain.features.module import load_module


def _images(colour_dir):
    return scan_folder(colour_dir).images


def test_extract_then_hit(tiny_module, colour_dir, tmp_path):
    module = load_module(tiny_module)
    cache = BottleneckCache(tmp_path, module.info.fingerprint, module.info.input_spec.key())
    first = extract_bottlenecks(_images(colour_dir), module, cache, batch_size=7)
    assert (first.hits, first.misses) == (0, 30)
    assert len(first.vectors) == 30 and all(v.shape == (8,) for v in first.vectors.values())
    second = extract_bottlenecks(_images(colour_dir), module, cache)
    assert (second.hits, second.misses) == (30, 0)
    for key, vector in first.vectors.items():
        np.testing.assert_array_equal(second.vectors[key], vector)
    assert not list(cache.dir.glob(".tmp-*"))


def test_cache_key_depends_on_module_and_preprocessing(tiny_module, tmp_path):
    module = load_module(tiny_module)
    a = BottleneckCache(tmp_path, module.info.fingerprint, module.info.input_spec.key())
    b = BottleneckCache(tmp_path, "0" * 64, module.info.input_spec.key())
    c = BottleneckCache(tmp_path, module.info.fingerprint, "other")
    assert len({a.dir, b.dir, c.dir}) == 3


def test_corrupt_shard_is_set_aside_and_recomputed(tiny_module, colour_dir, tmp_path):
    module = load_module(tiny_module)
    cache = BottleneckCache(tmp_path, module.info.fingerprint, module.info.input_spec.key())
    first = extract_bottlenecks(_images(colour_dir), module, cache)
    (shard,) = list(cache.dir.glob("*.npz"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte inside the vectors
    shard.write_bytes(bytes(data))
    fresh = BottleneckCache(tmp_path, module.info.fingerprint, module.info.input_spec.key())
    again = extract_bottlenecks(_images(colour_dir), module, fresh)
    assert again.misses == 30 and len(again.corrupt_shards) == 1
    for key, vector in first.vectors.items():
        np.testing.assert_allclose(again.vectors[key], vector, rtol=1e-6, atol=1e-6)
    assert list(cache.dir.glob(".corrupt-*"))


def test_truncated_shard_is_recomputed(tiny_module, colour_dir, tmp_path):
    module = load_module(tiny_module)
    cache = BottleneckCache(tmp_path, module.info.fingerprint, module.info.input_spec.key())
    extract_bottlenecks(_images(colour_dir), module, cache)
    (shard,) = list(cache.dir.glob("*.npz"))
    shard.write_bytes(shard.read_bytes()[:100])
    again = extract_bottlenecks(_images(colour_dir), module, BottleneckCache(tmp_path, module.info.fingerprint, module.info.input_spec.key()))
    assert again.misses == 30


def test_duplicate_content_is_computed_once(tiny_module, colour_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(colour_dir, data)
    source = next((data / "red").iterdir())
    shutil.copy(source, data / "blue" / "copy_of_red.jpg")  # same bytes in another class
    module = load_module(tiny_module)
    cache = BottleneckCache(tmp_path / "c", module.info.fingerprint, module.info.input_spec.key())
    result = extract_bottlenecks(scan_folder(data).images, module, cache)
    assert result.misses == 30


def test_vectors_are_read_back_from_disk_not_kept_in_memory(tiny_module, colour_dir, tmp_path):
    from retrain.features.vectors import VectorStore

    module = load_module(tiny_module)
    cache = BottleneckCache(tmp_path, module.info.fingerprint, module.info.input_spec.key())
    result = extract_bottlenecks(_images(colour_dir), module, cache, batch_size=4)
    assert isinstance(result.vectors, VectorStore)
    stored = cache.lookup(list(result.vectors))
    assert len(stored) == 30
    for key, vector in stored.items():
        np.testing.assert_array_equal(result.vectors[key], vector)
    assert not [p for p in cache.dir.iterdir() if p.name.startswith(".tmp-")]  # the store's file has no name


def test_vector_store_maps_keys_to_rows_as_it_grows(tmp_path):
    import pytest

    from retrain.features.vectors import VectorStore

    store = VectorStore(tmp_path / "store")
    assert len(store) == 0 and "a" not in store
    store.add(["a", "b"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(store["b"], [3, 4, 5])
    store.add(["c"], np.full((1, 3), 7.0))
    store.add([], np.zeros((0, 3), np.float32))
    np.testing.assert_array_equal(store["c"], [7, 7, 7])
    np.testing.assert_array_equal(store["a"], [0, 1, 2])
    assert sorted(store) == ["a", "b", "c"] and len(store) == 3
    store["a"][0] = 99  # a copy: the store does not change
    assert store["a"][0] == 0
    with pytest.raises(KeyError):
        store["z"]
    with pytest.raises(ValueError, match="dimension"):
        store.add(["d"], np.zeros((1, 4), np.float32))


def test_vector_store_falls_back_to_the_temporary_folder(tmp_path):
    from retrain.features.vectors import VectorStore

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    store = VectorStore(blocked / "cache")
    store.add(["a"], np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(store["a"], [1, 1])


def test_lookup_reads_only_shards_holding_wanted_keys(tiny_module, colour_dir, tmp_path):
    module = load_module(tiny_module)
    images = _images(colour_dir)
    cache = BottleneckCache(tmp_path, module.info.fingerprint, module.info.input_spec.key())
    extract_bottlenecks(images[:10], module, cache)
    (first,) = list(cache.dir.glob("*.npz"))
    extract_bottlenecks(images[10:], module, cache)
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damage the vectors of the first shard only
    first.write_bytes(bytes(data))
    fresh = BottleneckCache(tmp_path, module.info.fingerprint, module.info.input_spec.key())
    others = extract_bottlenecks(images[10:], module, fresh)
    assert (others.hits, others.misses, others.corrupt_shards) == (20, 0, [])  # the damaged shard was not read
    again = extract_bottlenecks(images, module, fresh)
    assert (again.hits, again.misses, len(again.corrupt_shards)) == (20, 10, 1)


def test_extract_batch_follows_the_image_size_unless_given():
    from retrain.config import TrainConfig
    from retrain.errors import ConfigError

    auto = TrainConfig()
    assert auto.batch_for_images(224, 224) == 128
    assert auto.batch_for_images(96, 96) == 128  # never above 128
    assert auto.batch_for_images(448, 448) == 32  # the same pixels per call
    assert auto.batch_for_images(4096, 4096) == 8  # never below 8
    assert TrainConfig(extract_batch_size=20).batch_for_images(448, 448) == 20
    with pytest.raises(ConfigError, match="--extract-batch-size must be at least 1"):
        TrainConfig.from_options(extract_batch_size=0)
