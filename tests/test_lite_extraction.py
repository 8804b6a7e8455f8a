"""Bottlenecks through LiteRT (features/lite.py): converted once per module and cached, checked
against TensorFlow on a probe batch before any of its vectors is kept, chosen by a measured rule,
recorded, and cleared with the cache."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from retrain import safety
from retrain.cli import main
from retrain.config import TrainConfig
from retrain.data.dataset import scan_folder
from retrain.errors import ConfigError, ModuleError
from retrain.features import lite
from retrain.features.bottlenecks import BottleneckCache, cache_summary, clear_cache, extract_bottlenecks
from retrain.features.module import load_module
from tiny_modules import save_tiny_module

FAST = ["--epochs", "3", "--quantize", "none", "--json", "--cv-folds", "2"]


@pytest.fixture(scope="module")
def module(tiny_module):
    return load_module(tiny_module)


@pytest.fixture(scope="module")
def other_flatbuffer(tmp_path_factory):
    """The converted file of another module with the same input and output shapes (other weights)."""
    other = load_module(save_tiny_module(tmp_path_factory.mktemp("other") / "tiny", seed=1))
    return lite.convert_module(other)


def _images(folder):
    return scan_folder(folder).images


def _cache(root, module):
    return BottleneckCache(root, module.info.fingerprint, module.info.input_spec.key())


def _extract(module, images, root, backend=None, batch_size=7):
    return extract_bottlenecks(images, module, _cache(root, module), batch_size, backend=backend)


def test_litert_vectors_are_tensorflow_s_within_the_tolerance_and_share_the_entry(module, colour_dir, tmp_path):
    images = _images(colour_dir)
    reference = _extract(module, images, tmp_path / "tf")
    backend = lite.ExtractionBackend(module, tmp_path / "lite", "litert")
    computed = _extract(module, images, tmp_path / "lite", backend)  # batches of 7: invokes of 4 and a padded 3
    record = backend.record
    assert record["backend"] == "litert" and backend.warnings == []
    assert record["probe"]["within"] and record["probe"]["images"] == 16
    assert record["conversion_seconds"] > 0 and record["threads"] >= 1
    assert (tmp_path / "lite" / safety.CONVERTED_DIR).is_dir()
    assert record["converted"] == str(lite.converted_path(tmp_path / "lite", module.info))
    scale = max(np.abs(v).max() for v in reference.vectors.values())
    worst = max(np.abs(computed.vectors[k] - reference.vectors[k]).max() for k in reference.vectors)
    assert sorted(computed.vectors) == sorted(reference.vectors) and worst <= lite.TOLERANCE * scale
    # the same cache entry (key unchanged): TensorFlow finds every LiteRT vector there
    again = _extract(module, images, tmp_path / "lite")
    assert (again.hits, again.misses) == (30, 0)


def test_the_forward_pads_the_last_invoke_and_matches_one_image_at_a_time(module, tmp_path):
    path, _ = lite.write_converted(module, tmp_path)
    spec = module.info.input_spec
    forward = lite.LiteForward(path, spec.height, spec.width, module.info.feature_dim, num_threads=1, invoke_batch=4)
    pixels = np.random.default_rng(0).integers(0, 256, (5, spec.height, spec.width, 3), dtype=np.uint8)
    together = forward(pixels)
    single = np.concatenate([forward(pixels[i:i + 1]) for i in range(5)])
    assert together.shape == (5, module.info.feature_dim)
    np.testing.assert_array_equal(together, single)


def test_the_conversion_is_cached_per_module_and_reused(module, colour_dir, tmp_path):
    images = _images(colour_dir)
    first = lite.ExtractionBackend(module, tmp_path / "cache", "litert")
    _extract(module, images[:10], tmp_path / "cache", first)
    path = lite.converted_path(tmp_path / "cache", module.info)
    stamp = path.stat().st_mtime_ns
    second = lite.ExtractionBackend(module, tmp_path / "cache", "auto")  # 20 images: only a cached file pays
    _extract(module, images[10:], tmp_path / "cache", second)
    assert second.record["backend"] == "litert" and second.record["conversion_seconds"] is None
    assert second.record["reason"] == "the module converted for LiteRT was cached"
    assert path.stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary left beside it


def test_auto_converts_only_when_it_pays(module, colour_dir, tmp_path):
    images = _images(colour_dir)
    few = lite.ExtractionBackend(module, tmp_path, "auto")
    _extract(module, images, tmp_path, few)
    assert few.record["backend"] == "tensorflow" and "30 image(s) to compute, fewer than" in few.record["reason"]
    assert not lite.converted_path(tmp_path, module.info).exists()
    many = lite.ExtractionBackend(module, tmp_path, "auto", min_images=30)
    _extract(module, images, tmp_path / "fresh", many)
    assert many.record["backend"] == "litert" and many.record["reason"].startswith("at least 30 images")
    assert lite.converted_path(tmp_path, module.info).is_file()


def test_auto_converts_for_any_count_when_the_run_converts_anyway(module, colour_dir, tmp_path):
    backend = lite.ExtractionBackend(module, tmp_path, "auto", converted_anyway=True)  # 30 images, fewer than 500
    _extract(module, _images(colour_dir), tmp_path, backend)
    assert backend.record["backend"] == "litert" and "exports the module's LiteRT conversion" in backend.record["reason"]
    assert lite.converted_path(tmp_path, module.info).is_file()


def test_a_default_train_extracts_with_the_conversion_its_export_makes(tiny_module, colour_dir, tmp_path):
    """Without --fine-tune, train's float32 file is the module's conversion: a small folder uses it for
    extraction too. With --fine-tune the export converts the tuned graph instead, and 500 images decide."""
    runner = CliRunner()
    done = runner.invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(tmp_path / "out"),
                                "--cache-dir", str(tmp_path / "cache"), *FAST], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    record = json.loads(done.stdout)["cache"]["backend"]
    assert record["backend"] == "litert" and record["requested"] == "auto" and record["probe"]["within"]
    assert "exports the module's LiteRT conversion" in record["reason"]
    assert list((tmp_path / "cache" / "litert").glob("*.tflite"))


def test_auto_leaves_a_gpu_to_tensorflow(module, colour_dir, tmp_path, monkeypatch):
    from retrain._tf import tf

    monkeypatch.setattr(tf().config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    backend = lite.ExtractionBackend(module, tmp_path, "auto", min_images=1)
    _extract(module, _images(colour_dir), tmp_path, backend)
    assert backend.record == {"backend": "tensorflow", "requested": "auto",
                              "reason": "TensorFlow runs the module on a GPU"}


def test_vectors_outside_the_tolerance_are_never_kept(module, colour_dir, tmp_path, monkeypatch, other_flatbuffer):
    monkeypatch.setattr(lite, "convert_module", lambda m: other_flatbuffer)
    images = _images(colour_dir)
    backend = lite.ExtractionBackend(module, tmp_path / "cache", "auto", min_images=1)
    computed = _extract(module, images, tmp_path / "cache", backend)
    assert backend.record["backend"] == "tensorflow" and not backend.record["probe"]["within"]
    (warning,) = backend.warnings
    assert "beyond the tolerance 0.0001" in warning and warning.endswith("TensorFlow computed the bottlenecks instead")
    reference = _extract(module, images, tmp_path / "tf")
    for key, vector in reference.vectors.items():
        np.testing.assert_array_equal(computed.vectors[key], vector)
    forced = lite.ExtractionBackend(module, tmp_path / "cache", "litert")
    with pytest.raises(ModuleError, match="beyond the tolerance .*: use --extract-backend tensorflow"):
        _extract(module, images, tmp_path / "forced", forced)


def test_a_conversion_started_ahead_is_the_one_used_and_its_failure_is_reported(module, colour_dir, tmp_path,
                                                                                 monkeypatch):
    import threading

    images = _images(colour_dir)
    calls, original = [], lite.convert_module

    def counted(m):
        calls.append(threading.current_thread().name)
        return original(m)

    monkeypatch.setattr(lite, "convert_module", counted)
    few = lite.ExtractionBackend(module, tmp_path / "cache", "auto")  # 30 images: converting would not pay
    assert not few.convert_ahead(len(images)) and calls == []
    backend = lite.ExtractionBackend(module, tmp_path / "cache", "auto", min_images=30)
    assert backend.convert_ahead(len(images))
    _extract(module, images, tmp_path / "cache", backend)
    assert backend.record["backend"] == "litert" and backend.record["reason"].startswith("at least 30 images")
    assert backend.record["conversion_seconds"] > 0 and len(calls) == 1 and calls[0].startswith("convert-ahead")
    cached = lite.ExtractionBackend(module, tmp_path / "cache", "auto", min_images=30)
    assert not cached.convert_ahead(len(images))  # the file is there: nothing to start

    def broken(m):
        raise RuntimeError("converter crashed\nsecond line")

    monkeypatch.setattr(lite, "convert_module", broken)
    failing = lite.ExtractionBackend(module, tmp_path / "other", "auto", min_images=30)
    assert failing.convert_ahead(len(images))
    computed = _extract(module, images, tmp_path / "other", failing)
    (warning,) = failing.warnings
    assert warning == ("LiteRT could not convert the module (converter crashed): "
                       "TensorFlow computed the bottlenecks instead")
    assert failing.record["backend"] == "tensorflow" and len(computed.vectors) == len(images)


def test_a_damaged_or_stale_cached_file_is_converted_again(module, colour_dir, tmp_path, other_flatbuffer):
    images = _images(colour_dir)
    path = lite.converted_path(tmp_path, module.info)
    for content in (b"not a flatbuffer", other_flatbuffer):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        backend = lite.ExtractionBackend(module, tmp_path, "auto")
        _extract(module, images, tmp_path / f"entry-{len(content)}", backend)
        assert backend.record["backend"] == "litert" and backend.warnings == []
        assert backend.record["reason"].startswith("the cached converted module failed")
        assert path.read_bytes() == lite.convert_module(module)


def test_train_records_the_backend_and_cache_clear_removes_the_converted_module(tiny_module, colour_dir, tmp_path):
    cache = tmp_path / "cache"
    runner = CliRunner()
    done = runner.invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(tmp_path / "out"),
                                "--cache-dir", str(cache), "--extract-backend", "litert", *FAST],
                         catch_exceptions=False)
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["cache"]["backend"]["backend"] == "litert" and result["cache"]["misses"] == 30
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["cache"]["backend"]["backend"] == "litert" and run["config"]["extract_backend"] == "litert"
    converted = lite.converted_path(cache, load_module(tiny_module).info)
    assert converted.is_file()
    # an untagged folder holding converted modules has the cache's layout; one with a user's file there has not
    shaped = tmp_path / "untagged" / safety.CONVERTED_DIR
    shaped.mkdir(parents=True)
    (shaped / converted.name).write_bytes(converted.read_bytes())
    assert safety.why_not_cache(shaped.parent) is None
    (shaped / "mine.tflite").write_bytes(b"a user's file")
    assert f"{safety.CONVERTED_DIR}/mine.tflite" in safety.why_not_cache(shaped.parent)
    shards = sum(entry["shards"] for entry in cache_summary(cache)["entries"])
    stale = converted.parent / f".{converted.name}.0123abcd"  # what a killed conversion leaves
    stale.write_bytes(b"partial")
    assert clear_cache(cache) >= shards + 2
    assert not converted.exists() and not stale.exists() and not converted.parent.exists()


def test_train_with_tensorflow_asked_for_and_a_forced_litert_mismatch(tiny_module, colour_dir, tmp_path, monkeypatch,
                                                                      other_flatbuffer):
    runner = CliRunner()
    done = runner.invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(tmp_path / "tf"),
                                "--cache-dir", str(tmp_path / "c1"), "--extract-backend", "tensorflow", *FAST],
                         catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["cache"]["backend"] == {
        "backend": "tensorflow", "requested": "tensorflow", "reason": "asked for (--extract-backend tensorflow)"}
    monkeypatch.setattr(lite, "convert_module", lambda m: other_flatbuffer)
    done = runner.invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(tmp_path / "lite"),
                                "--cache-dir", str(tmp_path / "c2"), "--extract-backend", "litert", *FAST])
    assert done.exit_code == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: LiteRT's vectors differ from TensorFlow's") and "Traceback" not in done.output
    assert not (tmp_path / "lite").exists()


def test_the_option_is_checked():
    with pytest.raises(ConfigError, match="did you mean 'litert'"):
        TrainConfig(extract_backend="lite")
    assert TrainConfig().extract_backend == "auto"
    done = CliRunner().invoke(main, ["train", ".", "-m", "x", "-o", "y", "--extract-backend", "gpu"])
    assert done.exit_code == 2


@pytest.mark.realdata
def test_the_real_module_s_litert_vectors_are_within_the_tolerance(real_data, tmp_path):
    module = load_module(str(real_data / "modules" / "mobilenet_v2_035_224"))
    images = scan_folder(real_data / "cats_and_dogs_filtered" / "train").images
    path, _ = lite.write_converted(module, tmp_path)
    spec = module.info.input_spec
    forward = lite.LiteForward(path, spec.height, spec.width, module.info.feature_dim)
    probe = lite.compare(module, forward, lite.probe_pixels(images, spec))
    assert probe["images"] == 16 and probe["max_abs_value"] > 1  # real photos: features of a real module
    assert probe["within"] and probe["relative_diff"] < lite.TOLERANCE / 5, probe  # measured 4.7e-6
