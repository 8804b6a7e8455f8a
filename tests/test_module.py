"""Module handles: local folders, trust policy, hub cache, input spec and output checks."""

import hashlib
import json
import shutil

import pytest

from retrain.errors import ModuleError
from retrain.features.module import check_trusted, fingerprint, load_module
from tiny_modules import save_tiny_module


def test_local_module_spec_and_fingerprint(tiny_module):
    loaded = load_module(tiny_module)
    assert (loaded.info.input_spec.height, loaded.info.input_spec.width) == (32, 32)
    assert loaded.info.feature_dim == 8
    assert loaded.info.fingerprint == fingerprint(tiny_module)


def test_fingerprint_follows_content_not_location(tiny_module, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_module, copy)
    assert fingerprint(copy) == fingerprint(tiny_module)
    (copy / "variables" / "variables.data-00000-of-00001").write_bytes(b"changed")
    assert fingerprint(copy) != fingerprint(tiny_module)


def test_variable_size_module_needs_image_size(tmp_path):
    path = save_tiny_module(tmp_path / "any", variable_size=True)
    with pytest.raises(ModuleError, match="--image-size"):
        load_module(path)
    assert load_module(path, image_size=48).info.input_spec.height == 48


def test_fixed_size_module_rejects_other_size(tiny_module):
    with pytest.raises(ModuleError, match="needs 32x32 images, but --image-size 64"):
        load_module(tiny_module, image_size=64)


def test_classifier_logits_are_refused(tmp_path):
    path = save_tiny_module(tmp_path / "logits", output="logits")
    with pytest.raises(ModuleError, match="feature_vector module is needed"):
        load_module(path)


def test_feature_map_is_refused(tmp_path):
    path = save_tiny_module(tmp_path / "map", output="map")
    with pytest.raises(ModuleError, match=r"not a feature vector \[batch, dim\]"):
        load_module(path)


def test_missing_and_non_savedmodel_folders(tmp_path):
    with pytest.raises(ModuleError, match="does not exist"):
        load_module(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModuleError, match="is not a SavedModel"):
        load_module(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModuleError, match="is not a folder"):
        load_module(str(tmp_path / "file"))


def test_corrupt_saved_model(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ModuleError, match="cannot be loaded as a SavedModel"):
        load_module(str(tmp_path / "bad"))


@pytest.mark.parametrize(
    "handle, message",
    [
        ("https://evil.example.com/m/1", "not trusted"),
        ("ftp://tfhub.dev/google/x/1", "only https URLs"),
        ("https://tfhub.dev/google/imagenet/mobilenet_v2_035_224/feature_vector", "names no version"),
        ("https://www.kaggle.com/models/google/mobilenet-v2/tensorFlow2/035-224-feature-vector", "names no version"),
    ],
)
def test_trust_policy(handle, message):
    with pytest.raises(ModuleError, match=message):
        check_trusted(handle)


def test_versioned_urls_are_trusted():
    check_trusted("https://tfhub.dev/google/imagenet/mobilenet_v2_035_224/feature_vector/5")
    check_trusted("https://www.kaggle.com/models/google/mobilenet-v2/tensorFlow2/035-224-feature-vector/2")
    check_trusted("https://tfhub.dev/google/imagenet/mobilenet_v2_035_224/feature_vector", allow_unversioned=True)


def test_uncached_url_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub"))
    with pytest.raises(ModuleError, match="cannot download module .*TFHUB_CACHE_DIR|cannot download module .*hub"):
        load_module("https://tfhub.dev/google/imagenet/mobilenet_v2_035_224/feature_vector/5")


def test_url_in_hub_cache_loads_offline(tiny_module, tmp_path, monkeypatch):
    handle = "https://tfhub.dev/google/imagenet/mobilenet_v2_035_224/feature_vector/5"
    cache = tmp_path / "hub"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    shutil.copytree(tiny_module, cache / hashlib.sha1(handle.encode("utf8")).hexdigest())
    loaded = load_module(handle)
    assert loaded.info.handle == handle
    assert loaded.info.fingerprint == fingerprint(tiny_module)


HANDLE = "https://tfhub.dev/google/imagenet/mobilenet_v2_035_224/feature_vector/5"


def _hub_entry(tmp_path, monkeypatch, handle=HANDLE):
    cache = tmp_path / "hub"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    return cache / hashlib.sha1(handle.encode("utf8")).hexdigest()


def test_url_fingerprint_is_recorded_and_an_altered_cache_entry_refused(tiny_module, tmp_path, monkeypatch):
    entry = _hub_entry(tmp_path, monkeypatch)
    shutil.copytree(tiny_module, entry)
    records = tmp_path / "records"
    load_module(HANDLE, records_dir=records)
    saved = json.loads((records / "modules.json").read_text())
    assert saved[HANDLE]["fingerprint"] == fingerprint(tiny_module)
    load_module(HANDLE, records_dir=records)  # same files: fine

    other = save_tiny_module(tmp_path / "other", seed=7)  # a loadable module, other weights
    shutil.rmtree(entry)
    shutil.copytree(other, entry)
    with pytest.raises(ModuleError) as caught:
        load_module(HANDLE, records_dir=records)
    message = str(caught.value)
    assert message.startswith(f"module cache entry {entry} for {HANDLE} is damaged")
    assert f"first loaded as {fingerprint(tiny_module)[:12]}" in message
    assert "delete that folder" in message and "\n" not in message
    assert json.loads((records / "modules.json").read_text()) == saved  # the record is not replaced


def test_unversioned_urls_are_not_pinned(tiny_module, tmp_path, monkeypatch):
    handle = HANDLE.rsplit("/", 1)[0]
    shutil.copytree(tiny_module, _hub_entry(tmp_path, monkeypatch, handle))
    load_module(handle, allow_unversioned=True, records_dir=tmp_path / "records")
    assert not (tmp_path / "records" / "modules.json").exists()


def test_damaged_cache_entries_are_one_clear_error(tiny_module, tmp_path, monkeypatch):
    entry = _hub_entry(tmp_path, monkeypatch)
    entry.mkdir(parents=True)
    (entry / "variables").mkdir()  # an interrupted copy: no saved_model.pb
    with pytest.raises(ModuleError, match=r"is damaged \(no saved_model.pb\): delete that folder"):
        load_module(HANDLE, records_dir=tmp_path / "r1")
    (entry / "saved_model.pb").write_bytes(b"\x08\x01truncated")
    with pytest.raises(ModuleError, match=r"is damaged \(it cannot be loaded: .*\): delete that folder"):
        load_module(HANDLE, records_dir=tmp_path / "r2")
