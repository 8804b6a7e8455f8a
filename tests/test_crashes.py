"""Kill and concurrency, with real processes: SIGKILL mid-extraction then resume; two runs on one cache."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import cached_vectors, finish_json, same_tflite_model
from tiny_modules import save_tiny_module, write_colour_images

COUNT = 370  # per class: 1110 images, two full shards of 512 and a part
ARGS = ["--epochs", "20", "--learning-rate", "0.05", "--quantize", "none", "--extract-batch-size", "32", "--json"]


@pytest.fixture(scope="module")
def slow_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    module = save_tiny_module(root / "slow", work=100)  # about 0.1 s per module call: extraction takes seconds
    images = write_colour_images(root / "images", counts={"blue": COUNT, "green": COUNT, "red": COUNT})
    return module, images


def _train(module, images, out, cache, **popen):
    command = [sys.executable, "-m", "retrain", "train", str(images), "--module", module, "--output", str(out),
               "--cache-dir", str(cache), *ARGS]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _same_vectors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)


def _kill_when(process, happened, what: str, timeout: float = 180) -> None:
    """SIGKILL ``process`` as soon as ``happened()`` is true (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not happened():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"no {what} in {timeout:g} s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(slow_setup, tmp_path_factory):
    """An uninterrupted run: what every other run must reproduce."""
    module, images = slow_setup
    root = tmp_path_factory.mktemp("reference")
    result = finish_json(_train(module, images, root / "out", root / "cache"))
    assert result["cache"]["misses"] == 3 * COUNT
    return result, root / "out", cached_vectors(root / "cache")


def test_sigkill_during_extraction_then_rerun_resumes_with_the_same_result(slow_setup, reference, tmp_path):
    module, images = slow_setup
    expected, expected_out, expected_vectors = reference
    out, cache = tmp_path / "out", tmp_path / "cache"
    _kill_when(_train(module, images, out, cache), lambda: list(cache.glob("*/[!.]*.npz")), "the first complete shard")
    kept = cached_vectors(cache)
    assert 0 < len(kept) < 3 * COUNT, "the kill did not land during extraction"
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))

    result = finish_json(_train(module, images, out, cache))
    assert result["cache"]["hits"] == len(kept)
    assert result["cache"]["misses"] == 3 * COUNT - len(kept)
    _same_vectors(cached_vectors(cache), expected_vectors)
    assert result["metrics"]["test"] == expected["metrics"]["test"]
    assert result["split"] == expected["split"]
    same_tflite_model(out, expected_out)


def test_sigkill_during_export_leaves_no_output_and_the_rerun_cleans_up(slow_setup, reference, tmp_path):
    module, images = slow_setup
    expected, expected_out, expected_vectors = reference
    out, cache = tmp_path / "out", tmp_path / "cache"
    _kill_when(_train(module, images, out, cache), lambda: list(tmp_path.glob(".out.partial-*")), "export's staging folder")
    assert not out.exists()  # nothing where a user would pick it up
    assert len(list(tmp_path.glob(".out.partial-*"))) == 1

    result = finish_json(_train(module, images, out, cache))
    assert result["cache"] == {**result["cache"], "hits": 3 * COUNT, "misses": 0}
    assert not list(tmp_path.glob(".out.partial-*"))  # the dead run's staging folder is gone
    same_tflite_model(out, expected_out)


def test_two_runs_sharing_one_cache_both_finish_correctly(slow_setup, reference, tmp_path):
    module, images = slow_setup
    expected, expected_out, expected_vectors = reference
    cache = tmp_path / "cache"
    first = _train(module, images, tmp_path / "a", cache)
    second = _train(module, images, tmp_path / "b", cache)
    results = [finish_json(first), finish_json(second)]
    for result, name in zip(results, "ab"):
        assert result["cache"]["hits"] + result["cache"]["misses"] == 3 * COUNT
        assert result["metrics"]["test"] == expected["metrics"]["test"]
        same_tflite_model(tmp_path / name, expected_out)
    _same_vectors(cached_vectors(cache), expected_vectors)
    assert not list(cache.glob("*/.tmp-*")) and not list(cache.glob("*/.corrupt-*"))
    third = finish_json(_train(module, images, tmp_path / "c", cache))
    assert (third["cache"]["hits"], third["cache"]["misses"]) == (3 * COUNT, 0)
