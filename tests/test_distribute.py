"""Several devices (retrain/distribute.py): extraction and fine-tuning under
tf.distribute.MirroredStrategy, here on two logical CPU devices, against the one-device path.

Logical devices must be made before TensorFlow starts its runtime, and the test session's
TensorFlow has started long before: each two-device run is a fresh Python process
(``_two_devices``) that makes them first, runs both paths and writes what it saw as JSON.

The tolerance for fine-tuning: on two replicas each replica sums its slice's losses and the
optimizer sums the replicas' gradients, where one device sums the whole batch at once, so float
sums run in another order and the two runs drift apart by rounding alone. Measured on the tiny
batch-norm module (3 epochs, Adam, dropout 0.2, on-the-fly augmentation, a last batch of one
image, padded): training and validation losses within 6e-8, module variables within 2e-7, the
head within 3e-8; the test allows ``FINE_TUNE_TOLERANCE`` (1e-5) on all of them. (On MobileNetV2
the drift is larger, up to about one Adam step per weight: README "Several GPUs on one machine".)
Extraction runs no sum across replicas: vectors are equal to the bit (the test allows 1e-6).
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

import retrain
from conftest import REAL_MODULE, ROOT, CATS_DOGS
from retrain.cli import main
from retrain.distribute import choose_devices
from retrain.errors import ConfigError

FINE_TUNE_TOLERANCE = 1e-5
VECTOR_TOLERANCE = 1e-6

PRELUDE = """
import json, sys
from pathlib import Path

import numpy as np
import tensorflow as tf

# Two logical CPU devices, before anything starts TensorFlow's runtime.
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

sys.path.insert(0, str(Path(sys.argv[1])))
args = json.loads(sys.argv[2])
work = Path(args["work"])
report = {"logical_cpus": len(tf.config.list_logical_devices("CPU"))}


def vectors(cache_root):
    \"\"\"Every vector in a cache folder (plain and augmented entries), by entry and key.\"\"\"
    found = {}
    for shard in sorted(Path(cache_root).glob("*/*.npz")):
        if shard.name.startswith("."):
            continue
        with np.load(shard) as data:
            for key, vector in zip(data["keys"].tolist(), data["vectors"]):
                found[shard.parent.name.split("-", 1)[1] + "/" + key] = vector
    return found


def compare_caches(first, second):
    a, b = vectors(first), vectors(second)
    same = sorted(a) == sorted(b)
    return {"keys": len(a), "same_keys": same,
            "max_abs_diff": max(float(np.abs(a[k] - b[k]).max()) for k in a) if same and a else None}


def direct(module, replicas, pixels):
    \"\"\"The replicated extractor against the module's own call on the same batch.\"\"\"
    one = module.pixel_features(tf.constant(pixels)).numpy()
    two = replicas.extractor.pixel_features(tf.constant(pixels)).numpy()
    return {"rows": [len(one), len(two)], "max_abs_diff": float(np.abs(one - two).max())}
"""

TINY = PRELUDE + """
import retrain
from click.testing import CliRunner
from retrain.cli import main
from retrain.distribute import choose_devices
from retrain.errors import ConfigError
from retrain.features.module import load_module

module, images = args["module"], args["images"]
# One device with a batch of 4 against two replicas with 2 each: the same global batches, the
# same random draws per batch. The 21 training images end in a batch of one: padded on two.
common = dict(quantize=(), epochs=40, learning_rate=0.05, augment=True, augment_copies=1, fine_tune=True,
              fine_tune_epochs=3, extract_batch_size=5)
runs = {}
for name, options in (("one", dict(fine_tune_batch_size=4)), ("two", dict(devices=2, fine_tune_batch_size=2))):
    result = retrain.train(images, module, work / name, cache_dir=str(work / f"cache-{name}"), **common, **options)
    run = json.loads((work / name / "run.json").read_text())
    saved = tf.saved_model.load(str(work / name / "saved_model"))
    runs[name] = {"devices": result.devices, "run_devices": run["devices"], "config_devices": run["config"]["devices"],
                  "fine_tune": result.fine_tune, "cache": result.cache, "augment_cache": result.augment["cache"],
                  "variables": {v.name: v.numpy().tolist() for v in saved.module_variables},
                  "head": [saved.head_kernel.numpy().tolist(), saved.head_bias.numpy().tolist()],
                  "test": result.metrics["test"]["accuracy"]}
report["runs"] = runs
report["caches"] = compare_caches(work / "cache-one", work / "cache-two")

loaded = load_module(module)
replicas = choose_devices(2)
replicas.load(loaded)
rng = np.random.default_rng(0)
report["direct"] = {n: direct(loaded, replicas, rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)) for n in (1, 3, 8)}
report["default_devices"] = choose_devices(None) is None  # logical CPUs are used only when asked for
try:
    choose_devices(2, "litert")
    report["litert"] = None
except ConfigError as error:
    report["litert"] = str(error)

cli = CliRunner().invoke(main, ["train", images, "-m", module, "-o", str(work / "cli"), "--cache-dir",
                                str(work / "cache-cli"), "--quantize", "none", "--devices", "2", "--json"])
report["cli"] = {"exit_code": cli.exit_code, "devices": json.loads(cli.stdout)["devices"] if cli.exit_code == 0 else cli.output}
(work / "report.json").write_text(json.dumps(report))
"""

REAL = PRELUDE + """
from retrain.data.dataset import scan_folder
from retrain.data.images import load_image
from retrain.distribute import choose_devices
from retrain.features.bottlenecks import BottleneckCache, extract_bottlenecks
from retrain.features.module import load_module

loaded = load_module(args["module"])
replicas = choose_devices(2)
replicas.load(loaded)
images = sorted(scan_folder(args["images"]).images, key=lambda i: i.path)[:args["count"]]
spec = loaded.info.input_spec
for name, extractor, batch in (("one", loaded, 8), ("two", replicas.extractor, 16)):
    cache = BottleneckCache(work / f"cache-{name}", loaded.info.fingerprint, spec.key())
    extract_bottlenecks(images, extractor, cache, batch)
report["caches"] = compare_caches(work / "cache-one", work / "cache-two")
pixels = np.stack([load_image(i.path, spec.height, spec.width) for i in images[:3]])
report["direct"] = {"3": direct(loaded, replicas, pixels), "1": direct(loaded, replicas, pixels[:1])}
(work / "report.json").write_text(json.dumps(report))
"""


def _two_devices(script: str, work, **args) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "script.py"
    path.write_text(textwrap.dedent(script))
    done = subprocess.run([sys.executable, str(path), str(ROOT / "tests"), json.dumps({"work": str(work), **args})],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((work / "report.json").read_text())


@pytest.fixture(scope="module")
def bn_module(tmp_path_factory):
    from tiny_modules import save_tiny_module

    return save_tiny_module(tmp_path_factory.mktemp("modules") / "tiny_bn", batch_norm=True)


@pytest.fixture(scope="module")
def two(bn_module, colour_dir, tmp_path_factory):
    return _two_devices(TINY, tmp_path_factory.mktemp("two-devices"), module=bn_module, images=str(colour_dir))


def test_the_subprocess_has_two_logical_devices_and_uses_them_only_when_asked(two):
    assert two["logical_cpus"] == 2
    assert two["default_devices"] is True
    one, both = two["runs"]["one"], two["runs"]["two"]
    assert one["devices"] == {"replicas": 1, "strategy": None, "extract_batch_size": 5, "fine_tune_batch_size": 4}
    assert both["devices"] == {"replicas": 2, "strategy": "MirroredStrategy", "devices": ["/device:CPU:0", "/device:CPU:1"],
                               "extract_batch_size": 10, "fine_tune_batch_size": 4}
    assert one["run_devices"] == one["devices"] and both["run_devices"] == both["devices"]
    assert (one["config_devices"], both["config_devices"]) == (None, 2)
    assert both["cache"]["backend"]["reason"] == "2 devices under MirroredStrategy"


def test_extraction_on_two_replicas_gives_the_one_device_vectors(two):
    caches = two["caches"]
    # 30 images, and 21 augmented copies (a last batch of 1 on two replicas: padded, then dropped)
    assert caches["same_keys"] and caches["keys"] == 30 + two["runs"]["one"]["augment_cache"]["misses"]
    assert two["runs"]["two"]["cache"]["misses"] == 30
    assert caches["max_abs_diff"] <= VECTOR_TOLERANCE
    for n, seen in two["direct"].items():
        assert seen["rows"] == [int(n), int(n)]  # fewer rows than replicas too: the padding is dropped
        assert seen["max_abs_diff"] <= VECTOR_TOLERANCE


def test_fine_tuning_on_two_replicas_stays_within_the_tolerance_of_one_device(two):
    one, both = two["runs"]["one"], two["runs"]["two"]
    assert one["fine_tune"]["epochs_run"] == both["fine_tune"]["epochs_run"] == 3
    assert one["fine_tune"]["kept"] == both["fine_tune"]["kept"] == "fine_tuned"
    for a, b in zip(one["fine_tune"]["history"], both["fine_tune"]["history"]):
        assert abs(a["loss"] - b["loss"]) <= FINE_TUNE_TOLERANCE
        assert abs(a["val_loss"] - b["val_loss"]) <= FINE_TUNE_TOLERANCE
    # the exported SavedModel holds the weights trained on the replicas (copied back to the exported copy)
    assert one["fine_tune"]["weights_fingerprint"] != one["fine_tune"]["original_weights_fingerprint"]
    assert both["fine_tune"]["weights_fingerprint"] != both["fine_tune"]["original_weights_fingerprint"]
    assert one["fine_tune"]["original_weights_fingerprint"] == both["fine_tune"]["original_weights_fingerprint"]
    assert sorted(one["variables"]) == sorted(both["variables"])
    moved = 0.0
    for name in one["variables"]:
        a, b = np.asarray(one["variables"][name]), np.asarray(both["variables"][name])
        assert np.abs(a - b).max() <= FINE_TUNE_TOLERANCE, name
    for a, b in zip(one["head"], both["head"]):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= FINE_TUNE_TOLERANCE
        moved = max(moved, float(np.abs(np.asarray(a)).max()))
    assert moved > 0
    assert one["test"] == both["test"]


def test_the_cli_takes_devices_and_litert_on_several_devices_is_refused(two):
    assert two["cli"]["exit_code"] == 0, two["cli"]["devices"]
    assert two["cli"]["devices"]["replicas"] == 2
    assert "--extract-backend litert runs on the CPU" in two["litert"] and "--devices 1" in two["litert"]


def test_more_devices_than_there_are_is_one_error_line(colour_dir, tiny_module, tmp_path):
    import tensorflow as tf

    wanted = max(2, len(tf.config.list_logical_devices("GPU")) + 1)
    with pytest.raises(ConfigError, match=f"--devices {wanted}: only"):
        choose_devices(wanted)
    assert choose_devices(1) is None
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(out), "--devices",
                                       str(wanted), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(f"Error: --devices {wanted}: only")
    assert not out.exists()
    result = CliRunner().invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(out), "--devices", "0"])
    assert result.exit_code == 1 and "Error: --devices must be at least 1, got 0" in result.output


def test_one_device_records_one_replica(colour_dir, tiny_module, tmp_path):
    result = retrain.train(colour_dir, tiny_module, tmp_path / "out", cache_dir=str(tmp_path / "cache"), quantize=())
    assert result.devices["replicas"] == 1 and result.devices["strategy"] is None
    assert json.loads((tmp_path / "out" / "run.json").read_text())["devices"] == result.devices


@pytest.mark.realdata
def test_mobilenet_vectors_on_two_replicas_equal_one_device(real_data, tmp_path):
    report = _two_devices(REAL, tmp_path / "real", module=str(REAL_MODULE), images=str(CATS_DOGS / "train"), count=40)
    assert report["caches"]["same_keys"] and report["caches"]["keys"] == 40
    assert report["caches"]["max_abs_diff"] <= VECTOR_TOLERANCE
    for seen in report["direct"].values():
        assert seen["rows"][0] == seen["rows"][1] and seen["max_abs_diff"] <= VECTOR_TOLERANCE
