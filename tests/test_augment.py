"""--augment: deterministic augmented copies, cached like plain bottlenecks, for training only."""

import numpy as np
import pytest
from click.testing import CliRunner

import retrain
from retrain.data.augment import DEFAULT_AUGMENTATION, Augmentation, augment_pixels, copy_key
from retrain.cli import main
from retrain.errors import ConfigError

FAST = dict(epochs=40, learning_rate=0.05, patience=10, quantize=())


def _gradient_image(n=2, size=16):
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    image = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 99.0)], axis=-1)
    return np.repeat(image.astype(np.uint8)[None], n, axis=0)


def test_identity_parameters_leave_pixels_unchanged_and_a_flipped_box_mirrors():
    pixels = _gradient_image()
    identity = {"boxes": np.asarray([[0, 0, 1, 1], [0, 1, 1, 0]], np.float32),
                "brightness": np.zeros(2, np.float32), "contrast": np.ones(2, np.float32)}
    out = augment_pixels(pixels, identity)
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    np.testing.assert_array_equal(out[0], pixels[0])
    np.testing.assert_array_equal(out[1], pixels[1][:, ::-1])


def test_copies_are_a_function_of_content_copy_and_settings():
    a = copy_key("ab" * 32, 0, DEFAULT_AUGMENTATION)
    assert a == copy_key("ab" * 32, 0, DEFAULT_AUGMENTATION)
    assert len({a, copy_key("ab" * 32, 1, DEFAULT_AUGMENTATION), copy_key("cd" * 32, 0, DEFAULT_AUGMENTATION),
                copy_key("ab" * 32, 0, Augmentation(brightness=0.3))}) == 4
    b = copy_key("ab" * 32, 1, DEFAULT_AUGMENTATION)
    one, again = DEFAULT_AUGMENTATION.draw_for_keys([a, b]), DEFAULT_AUGMENTATION.draw_for_keys([b, a])
    np.testing.assert_array_equal(one["boxes"][0], again["boxes"][1])  # a key's draw does not depend on its batch
    assert not np.array_equal(one["boxes"][0], one["boxes"][1])
    pixels = _gradient_image(2)
    assert not np.array_equal(augment_pixels(pixels, one)[0], pixels[0])


@pytest.fixture(scope="module")
def augmented_runs(tiny_module, colour_dir, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    base = tmp_path_factory.mktemp("aug")
    first = retrain.train(colour_dir, tiny_module, base / "a", cache_dir=cache, augment=True, augment_copies=3, **FAST)
    second = retrain.train(colour_dir, tiny_module, base / "b", cache_dir=cache, augment=True, augment_copies=3, **FAST)
    return first, second


def test_augmented_cache_is_hit_on_the_second_run(augmented_runs):
    first, second = augmented_runs
    n_train = first.split["train"]
    assert first.augment["cache"]["misses"] == 3 * n_train and first.augment["cache"]["hits"] == 0
    assert second.augment["cache"]["misses"] == 0 and second.augment["cache"]["hits"] == 3 * n_train
    assert (second.cache["hits"], second.cache["misses"]) == (30, 0)
    assert first.head["training_vectors"] == 4 * n_train  # originals + 3 copies; validation and test untouched
    assert second.metrics["test"] == first.metrics["test"]
    assert first.metrics["test"]["accuracy"] == 1.0
    assert "augment" in first.timings


def test_augmented_vectors_differ_from_plain_ones_and_are_training_only(augmented_runs, tiny_module, colour_dir):
    from pathlib import Path

    from retrain.data.augment import augmented_cache
    from retrain.features.bottlenecks import BottleneckCache
    from retrain.data.dataset import split_dataset
    from retrain.features.module import load_module

    first, _ = augmented_runs
    info = load_module(tiny_module).info
    root = Path(first.cache["dir"]).parent
    copies = augmented_cache(root, info, DEFAULT_AUGMENTATION)
    assert str(copies.dir) == first.augment["cache"]["dir"]
    plain = BottleneckCache(root, info.fingerprint, info.input_spec.key())
    split = split_dataset(colour_dir, 10, 10)
    # the logistic head folds the validation images into training: they get copies too; test images never
    keys = [copy_key(i.content_hash, k, DEFAULT_AUGMENTATION) for i in split.train + split.validation for k in range(3)]
    found = copies.lookup(keys)
    assert len(found) == len(keys)
    held_out = [copy_key(i.content_hash, 0, DEFAULT_AUGMENTATION) for i in split.test]
    assert not copies.lookup(held_out)
    originals = plain.lookup([i.content_hash for i in split.train])
    image = split.train[0]
    assert not np.allclose(found[copy_key(image.content_hash, 0, DEFAULT_AUGMENTATION)], originals[image.content_hash])


def test_inconsistent_augment_options_are_one_line_errors(tiny_module, colour_dir, tmp_path):
    with pytest.raises(ConfigError, match="--augment-copies needs --augment"):
        retrain.train(colour_dir, tiny_module, tmp_path / "x", augment_copies=3)
    with pytest.raises(ConfigError, match="--augment-copies 0 without --fine-tune augments nothing"):
        retrain.train(colour_dir, tiny_module, tmp_path / "x", augment=True, augment_copies=0)
    result = CliRunner().invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(tmp_path / "x"),
                                       "--augment-copies", "2"])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("Error: --augment-copies needs --augment (it sets how many augmented "
                                     "bottlenecks are cached per image)")
    assert not (tmp_path / "x").exists()
