import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_modules import save_tiny_module, write_colour_images  # noqa: E402

SHARED_DATA = Path(os.environ.get("RETRAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))
REAL_MODULE = SHARED_DATA / "modules" / "mobilenet_v2_035_224"
CATS_DOGS = SHARED_DATA / "cats_and_dogs_filtered"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test touches the user's cache or TF Hub cache."""
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "default-cache"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hub-cache"))


@pytest.fixture(scope="session")
def tiny_module(tmp_path_factory):
    return save_tiny_module(tmp_path_factory.mktemp("modules") / "tiny")


@pytest.fixture(scope="session")
def colour_dir(tmp_path_factory):
    return write_colour_images(tmp_path_factory.mktemp("data") / "colours")


@pytest.fixture
def real_data():
    """Real images and the real module from ../shared/data; a failure (not a skip) when missing."""
    missing = [str(p) for p in (REAL_MODULE, CATS_DOGS) if not p.exists()]
    if missing:
        pytest.fail(f"real data missing: {', '.join(missing)} (set RETRAIN_SHARED_DATA)")
    return SHARED_DATA


# --- helpers shared by the tests that run the command in real processes -------------------------


def finish_json(process, timeout=300) -> dict:
    """The JSON a ``retrain ... --json`` subprocess printed; it must have succeeded without a traceback."""
    import json

    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    return json.loads(stdout)


def cached_vectors(cache: Path, unique_keys: bool = False) -> dict:
    """Every vector in the cache, each shard checked whole (checksum as the cache verifies it);
    ``unique_keys``: each key in one shard only (a key in two shards was computed twice)."""
    import numpy as np

    from retrain.features.bottlenecks import _checksum

    vectors = {}
    for shard in sorted(p for p in cache.glob("*/*.npz") if not p.name.startswith(".")):
        with np.load(shard, allow_pickle=False) as data:
            keys, values, checksum = data["keys"], data["vectors"], str(data["checksum"])
        assert keys.shape[0] == values.shape[0] > 0
        assert _checksum(keys, values) == checksum, f"corrupt shard {shard}"
        for key, value in zip(keys.tolist(), values):
            assert not (unique_keys and key in vectors), f"{key} computed twice"
            vectors.setdefault(key, value)
    return vectors


def same_tflite_model(a: Path, b: Path, atol: float = 0.0) -> None:
    """Same tensors in both float32 TFLite files (their bytes differ from run to run), constants
    within ``atol`` (0: equal), and the same labels."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    first, second = Interpreter(str(a / "model.tflite")), Interpreter(str(b / "model.tflite"))
    constants = 0
    for x, y in zip(first.get_tensor_details(), second.get_tensor_details(), strict=True):
        assert (x["name"], list(x["shape"])) == (y["name"], list(y["shape"]))
        try:
            values = first.get_tensor(x["index"])
        except ValueError:  # not a constant: no data before inference
            continue
        np.testing.assert_allclose(values, second.get_tensor(y["index"]), rtol=0, atol=atol)
        constants += 1
    assert constants > 0
    assert (a / "labels.txt").read_text() == (b / "labels.txt").read_text()
