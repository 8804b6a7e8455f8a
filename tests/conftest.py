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
