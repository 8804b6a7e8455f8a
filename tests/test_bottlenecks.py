"""The bottleneck cache: hits, atomic shards, corruption detected and recomputed."""

import numpy as np

from retrain.bottlenecks import BottleneckCache, extract_bottlenecks
from retrain.dataset import scan_folder
from retrain.module import load_module


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
