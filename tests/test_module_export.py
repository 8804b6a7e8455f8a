"""``retrain module export``: a train output's module as a reusable TF Hub style feature-vector module.

Round trips on a tiny batch-norm module: the export of a fine-tuned run computes the fine-tuned
vectors (checked against the variables the run's SavedModel holds, and through the trained head
against its probabilities); the export of a frozen run computes the source module's vectors;
``hub.load`` and ``hub.KerasLayer(trainable=True)`` in a ``tf_keras`` model (another process)
build, run and train it; ``retrain train --module EXPORTED`` trains on it. Then the refusals.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

import retrain
from conftest import REAL_MODULE, SHARED_DATA
from retrain.cli import main
from retrain.errors import ModelError, ModuleError, OutputError
from retrain.features.module import fingerprint, load_module
from retrain.serving import publish
from retrain.serving.publish import DOC_FILES, export_module
from tiny_modules import save_tiny_module

FAST = dict(epochs=40, learning_rate=0.05, patience=10, quantize=())
STATISTICS = {"bn/moving_mean:0", "bn/moving_variance:0"}
TRAINED = {"conv/kernel:0", "conv/bias:0", "bn/gamma:0", "bn/beta:0"}


@pytest.fixture(scope="module")
def bn_module(tmp_path_factory):
    return save_tiny_module(tmp_path_factory.mktemp("modules") / "tiny_bn", batch_norm=True)


@pytest.fixture(scope="module")
def tuned(bn_module, colour_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "out"
    result = retrain.train(colour_dir, bn_module, out, cache_dir=str(tmp_path_factory.mktemp("cache")),
                           fine_tune=True, fine_tune_epochs=4, **FAST)
    assert result.fine_tune["kept"] == "fine_tuned"  # these settings improve validation (see test_finetune.py)
    return out


@pytest.fixture(scope="module")
def frozen(bn_module, colour_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen") / "out"
    retrain.train(colour_dir, bn_module, out, cache_dir=str(tmp_path_factory.mktemp("cache")), **FAST)
    return out


@pytest.fixture(scope="module")
def exported(tuned, tmp_path_factory):
    """The fine-tuned run exported through the command line."""
    module_dir = tmp_path_factory.mktemp("exports") / "colours-v1"
    result = CliRunner().invoke(main, ["module", "export", str(tuned), str(module_dir), "--license", "Apache 2.0",
                                       "--owner", "someone", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), module_dir


def _pixels(colour_dir, size=32):
    from retrain.data.images import load_image

    return np.stack([load_image(str(p), size, size) for p in sorted(colour_dir.rglob("*.jpg"))])


def _fine_tuned_features(bn_module, out, pixels):
    """The fine-tuned module's vectors, independently of export: the source module with the values
    the run's SavedModel holds (``module_variables`` lists the module's variables first, in order)."""
    import tensorflow as tf

    saved = tf.saved_model.load(str(out / "saved_model"))
    module = load_module(bn_module)
    assert [v.name for v in saved.module_variables] == [v.name for v in module.obj.variables]
    for target, value in zip(module.obj.variables, saved.module_variables):
        target.assign(value)
    head = (saved.head_kernel.numpy(), saved.head_bias.numpy())
    return module.features(tf.constant(pixels, tf.float32) / 255.0).numpy(), head


def _vectors(module_dir, pixels, training=False):
    import tensorflow as tf

    return tf.saved_model.load(str(module_dir))(tf.constant(pixels, tf.float32) / 255.0, training=training).numpy()


def test_fine_tuned_export_computes_the_fine_tuned_vectors(exported, tuned, bn_module, colour_dir):
    from retrain.evaluation.runner import SavedModelRunner

    data, module_dir = exported
    pixels = _pixels(colour_dir)
    expected, (kernel, bias) = _fine_tuned_features(bn_module, tuned, pixels)
    vectors = _vectors(module_dir, pixels)
    assert vectors.shape == (30, 8)
    assert np.abs(vectors - expected).max() <= 1e-6
    source = load_module(bn_module).features(pixels.astype(np.float32) / 255.0).numpy()
    assert np.abs(vectors - source).max() > 1e-3  # fine-tuning changed them: the comparison above is not trivial
    logits = vectors @ kernel + bias
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    np.testing.assert_allclose(probabilities, SavedModelRunner(tuned / "saved_model").predict(pixels), atol=1e-6)
    checks = data["checks"]
    assert checks["max_abs_diff_features"] <= 1e-6 and checks["max_abs_diff_probabilities"] <= 1e-6
    assert checks["max_abs_diff_signature"] <= 1e-6
    assert data["weights_changed"] is True and data["variables_changed"] == 4  # the trained four, not the statistics
    assert data["variables"] == 6 and data["trainable_variables"] == 4 and data["regularization_losses"] == 0


def test_frozen_export_reproduces_the_source_module(frozen, bn_module, colour_dir, tmp_path):
    result = export_module(frozen, tmp_path / "frozen-module", license="Apache 2.0")
    pixels = _pixels(colour_dir)
    source = load_module(bn_module).features(pixels.astype(np.float32) / 255.0).numpy()
    assert np.abs(_vectors(tmp_path / "frozen-module", pixels) - source).max() <= 1e-6
    assert result.weights_changed is False and result.variables_changed == 0
    assert "Not fine-tuned" in (tmp_path / "frozen-module" / "README.md").read_text()


def test_the_reusable_savedmodel_contract(exported, colour_dir):
    import tensorflow as tf

    _, module_dir = exported
    obj = tf.saved_model.load(str(module_dir))
    traced = {}
    for function in obj.__call__.concrete_functions:
        args, _ = function.structured_input_signature
        traced[args[1]] = args[0]
    assert set(traced) == {False, True}
    for spec in traced.values():
        assert spec.shape.as_list() == [None, 32, 32, 3] and spec.dtype == tf.float32
    names = {v.name for v in obj.variables}
    trainable = {v.name for v in obj.trainable_variables}
    assert trainable == TRAINED and names == TRAINED | STATISTICS  # batch-norm statistics are not trainable
    assert list(obj.regularization_losses) == []
    signature = obj.signatures["serving_default"]
    (name, spec), = signature.structured_input_signature[1].items()
    assert name == "images" and spec.shape.as_list() == [None, 32, 32, 3]
    pixels = _pixels(colour_dir)[:6]
    images = tf.constant(pixels, tf.float32) / 255.0
    np.testing.assert_allclose(signature(images=images)["feature_vector"].numpy(), obj(images, training=False).numpy(),
                               atol=1e-7)
    # training=True is the source module's training mode (batch statistics): other vectors
    assert np.abs(obj(images, training=True).numpy() - obj(images, training=False).numpy()).max() > 1e-3


HUB_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_hub as hub
    import tf_keras

    module_dir, pixels_file = sys.argv[1], sys.argv[2]
    images = np.load(pixels_file).astype(np.float32) / 255.0
    vectors = hub.load(module_dir)(images, training=False).numpy()
    layer = hub.KerasLayer(module_dir, trainable=True)
    model = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), layer, tf_keras.layers.Dense(3)])
    model.compile(optimizer=tf_keras.optimizers.SGD(0.1),
                  loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    layer_vectors = layer(images, training=False).numpy()  # before the step below changes the weights
    before = {w.name: w.numpy().copy() for w in layer.trainable_weights}
    history = model.fit(images, np.arange(len(images)) % 3, epochs=1, batch_size=len(images), verbose=0)
    print(json.dumps({
        "keras": tf_keras.__version__,
        "vectors": vectors.tolist(),
        "layer_vectors": layer_vectors.tolist(),
        "trainable": [w.name for w in layer.trainable_weights],
        "non_trainable": [w.name for w in layer.non_trainable_weights],
        "changed": [w.name for w in layer.trainable_weights if np.abs(w.numpy() - before[w.name]).max() > 0],
        "loss": history.history["loss"][0],
    }))
""")


def test_hub_load_and_keras_layer_in_a_tf_keras_model(exported, tuned, bn_module, colour_dir, tmp_path):
    """In another process, as a user's tf_keras program would load it."""
    _, module_dir = exported
    pixels = _pixels(colour_dir)[::3]
    np.save(tmp_path / "pixels.npy", pixels)
    (tmp_path / "hub_check.py").write_text(HUB_SCRIPT)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, str(tmp_path / "hub_check.py"), str(module_dir), str(tmp_path / "pixels.npy")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["keras"].startswith("2.")
    expected, _ = _fine_tuned_features(bn_module, tuned, pixels)
    assert np.abs(np.asarray(report["vectors"]) - expected).max() <= 1e-6
    assert np.abs(np.asarray(report["layer_vectors"]) - expected).max() <= 1e-6
    assert set(report["trainable"]) == TRAINED  # the fine-tuned weights, exposed for training
    assert STATISTICS <= set(report["non_trainable"])
    assert set(report["changed"]) == TRAINED and np.isfinite(report["loss"])  # one step trained them


def test_retrain_trains_on_the_exported_module(exported, tuned, bn_module, colour_dir, tmp_path):
    from retrain.data.dataset import scan_folder
    from retrain.features.bottlenecks import BottleneckCache, extract_bottlenecks

    data, module_dir = exported
    out, cache = tmp_path / "again", tmp_path / "cache"
    result = CliRunner().invoke(main, ["train", str(colour_dir), "-m", str(module_dir), "-o", str(out), "--cache-dir",
                                       str(cache), "--json", "--epochs", "40", "--learning-rate", "0.05",
                                       "--quantize", "none", "--fine-tune", "--fine-tune-epochs", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    assert trained["module"]["fingerprint"] == fingerprint(module_dir) == data["folder_fingerprint"]
    assert trained["module"]["trainable_variables"] == 4 and trained["fine_tune"]["epochs_run"] >= 1
    assert trained["metrics"]["test"]["accuracy"] == 1.0
    # the vectors it cached are the fine-tuned module's
    module = load_module(str(module_dir))
    images = scan_folder(colour_dir).images
    cached = extract_bottlenecks(images, module, BottleneckCache(cache, module.info.fingerprint,
                                                                 module.info.input_spec.key()))
    assert (cached.hits, cached.misses) == (30, 0)
    from retrain.data.images import load_image

    pixels = np.stack([load_image(i.path, 32, 32) for i in images])
    expected, _ = _fine_tuned_features(bn_module, tuned, pixels)
    got = np.stack([cached.vectors[i.content_hash] for i in images])
    assert np.abs(got - expected).max() <= 1e-5
    # and that run's module exports in turn, its source being the exported module
    second = export_module(out, tmp_path / "second")
    assert second.source["fingerprint"] == data["folder_fingerprint"]
    assert second.checks["max_abs_diff_probabilities"] <= 1e-6


def test_readme_fingerprint_and_kaggle_metadata(exported, tuned, bn_module, tmp_path):
    data, module_dir = exported
    run = json.loads((tuned / "run.json").read_text())
    readme = (module_dir / "README.md").read_text()
    for text in (bn_module, run["module"]["fingerprint"], data["fingerprint"], "Apache 2.0", "blue, green, red",
                 f"{run['split']['train']} train", f"{run['fine_tune']['epochs_run']} epoch(s)",
                 "float32 `[batch, 32, 32, 3]`, RGB in [0, 1]", "`[batch, 8]`", "kagglehub.model_upload(",
                 "someone/colours-v1/tensorFlow2/feature-vector", 'license_name="Apache 2.0"'):
        assert text in readme, text
    # The fingerprint recorded is the SavedModel files' own: a copy without the documentation files has it.
    alone = tmp_path / "alone"
    shutil.copytree(module_dir, alone, ignore=shutil.ignore_patterns(*DOC_FILES))
    assert fingerprint(alone) == data["fingerprint"] != data["folder_fingerprint"] == fingerprint(module_dir)
    metadata = json.loads((module_dir / "model-metadata.json").read_text())
    assert set(metadata) == {"ownerSlug", "title", "slug", "subtitle", "isPrivate", "description", "publishTime",
                             "provenanceSources"}
    assert metadata["ownerSlug"] == "someone" and metadata["slug"] == "colours-v1" and metadata["isPrivate"] is True
    assert metadata["provenanceSources"] == bn_module and data["fingerprint"] in metadata["description"]
    marker = json.loads((module_dir / "retrain-module.json").read_text())
    assert marker["tool"] == "retrain" and marker["output_kind"] == "module"
    listed = sorted(str(p.relative_to(module_dir)) for p in module_dir.rglob("*") if p.is_file())
    assert marker["files"] == listed
    assert not [p for p in module_dir.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_the_check_catches_a_module_without_the_trained_values(tuned, bn_module, tmp_path, monkeypatch):
    copy_values = publish._copy_trained_values

    def into_another_copy(loaded, model_dir):  # the exported module keeps the source's values
        return copy_values(load_module(bn_module), model_dir)

    monkeypatch.setattr(publish, "_copy_trained_values", into_another_copy)
    with pytest.raises(ModelError, match="probabilities up to .* away from .*nothing was written"):
        export_module(tuned, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists() and list(tmp_path.iterdir()) == []


def test_a_signature_only_module_gets_both_training_values(colour_dir, tmp_path):
    import tensorflow as tf

    source = tmp_path / "signature_only"

    class SignatureOnly(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="images")])
        def serve(self, images):
            pooled = tf.reduce_mean(images, [1, 2])
            return {"feature_vector": tf.concat([pooled, tf.nn.relu(pooled @ self.kernel)], 1)}

    saving = SignatureOnly()
    tf.saved_model.save(saving, str(source), signatures={"serving_default": saving.serve})
    retrain.train(colour_dir, str(source), tmp_path / "out", cache_dir=str(tmp_path / "cache"), **FAST)
    result = export_module(tmp_path / "out", tmp_path / "module")
    assert result.variables == 1 and result.trainable_variables == 0
    assert any("no trainable variables" in w for w in result.warnings)
    assert any("no --license given" in w for w in result.warnings)
    assert "not stated" in (tmp_path / "module" / "README.md").read_text()
    pixels = _pixels(colour_dir)[:5]
    expected = load_module(str(source)).features(pixels.astype(np.float32) / 255.0).numpy()
    for training in (False, True):
        assert np.abs(_vectors(tmp_path / "module", pixels, training) - expected).max() <= 1e-6


def test_regularization_losses_travel_with_the_trained_values(colour_dir, tmp_path):
    import tensorflow as tf

    source = tmp_path / "regularized"

    class Regularized(tf.Module):
        variables = None
        trainable_variables = None
        regularization_losses = None

        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32), name="kernel")
            self.variables = self.trainable_variables = [self.kernel]
            self.regularization_losses = [tf.function(lambda: 0.01 * tf.reduce_sum(tf.square(self.kernel)),
                                                      input_signature=[])]

        @tf.function
        def __call__(self, images, training=False):
            pooled = tf.reduce_mean(images, [1, 2])
            return tf.concat([pooled, tf.nn.relu(pooled @ self.kernel)], 1)

    saving = Regularized()
    spec = tf.TensorSpec([None, 32, 32, 3], tf.float32)
    for training in (False, True):
        saving.__call__.get_concrete_function(spec, training=training)
    tf.saved_model.save(saving, str(source))
    retrain.train(colour_dir, str(source), tmp_path / "out", cache_dir=str(tmp_path / "cache"), fine_tune=True,
                  fine_tune_epochs=2, **FAST)
    result = export_module(tmp_path / "out", tmp_path / "module")
    assert result.regularization_losses == 1 and result.weights_changed  # the kernel below is a trained one
    saved = tf.saved_model.load(str(tmp_path / "out" / "saved_model"))
    trained_kernel = saved.module_variables[0].numpy()
    reloaded = tf.saved_model.load(str(tmp_path / "module"))
    assert float(reloaded.regularization_losses[0]()) == pytest.approx(0.01 * float(np.square(trained_kernel).sum()),
                                                                        rel=1e-6)


# --- refusals ---------------------------------------------------------------------------------------


def _one_error_line(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_refuses_a_folder_that_is_not_a_retrain_output(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "run.json").write_text('{"tool": "other"}')
    line = _one_error_line(["module", "export", str(tmp_path / "photos"), str(tmp_path / "module")])
    assert "is not a retrain output folder" in line
    assert "is not a folder" in _one_error_line(["module", "export", str(tmp_path / "nowhere"), str(tmp_path / "m")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_refuses_when_the_source_module_is_gone_or_another(colour_dir, tmp_path):
    source = save_tiny_module(tmp_path / "source", batch_norm=True)
    retrain.train(colour_dir, source, tmp_path / "out", cache_dir=str(tmp_path / "cache"), **FAST)
    shutil.move(source, tmp_path / "moved")
    line = _one_error_line(["module", "export", str(tmp_path / "out"), str(tmp_path / "module")])
    assert "the source module of" in line and "does not exist" in line and "--source-module" in line
    other = save_tiny_module(tmp_path / "other", seed=3)
    line = _one_error_line(["module", "export", str(tmp_path / "out"), str(tmp_path / "module"),
                            "--source-module", other])
    assert "fingerprint" in line and "the very module the run used" in line
    assert not (tmp_path / "module").exists()
    # the same files elsewhere: the recorded fingerprint accepts them
    result = export_module(tmp_path / "out", tmp_path / "module", source_module=str(tmp_path / "moved"))
    assert result.source["fingerprint"] == fingerprint(tmp_path / "moved")


def test_refuses_a_module_folder_with_user_files_and_replaces_only_an_earlier_export(frozen, tmp_path):
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):
        line = _one_error_line(["module", "export", str(frozen), str(documents), *flags])
        assert "never replaces it" in line
    assert sorted(p.name for p in documents.iterdir()) == ["thesis.txt"]
    assert (documents / "thesis.txt").read_text() == "mine"

    first = export_module(frozen, tmp_path / "module")
    assert "pass --overwrite" in _one_error_line(["module", "export", str(frozen), str(tmp_path / "module")])
    again = export_module(frozen, tmp_path / "module", overwrite=True, license="MIT")
    assert again.folder_fingerprint == fingerprint(tmp_path / "module") != first.folder_fingerprint  # replaced
    assert "| license | MIT |" in (tmp_path / "module" / "README.md").read_text()
    (tmp_path / "module" / "notes.txt").write_text("mine too")
    line = _one_error_line(["module", "export", str(frozen), str(tmp_path / "module"), "--overwrite"])
    assert "file(s) retrain did not write" in line and (tmp_path / "module" / "notes.txt").exists()
    assert "lies inside the model folder" in _one_error_line(["module", "export", str(frozen), str(frozen / "module")])
    with pytest.raises(OutputError, match="is the model folder"):
        export_module(frozen, frozen)


def test_the_source_module_missing_from_python_is_a_module_error(tuned, tmp_path):
    with pytest.raises(ModuleError, match="cannot be loaded"):
        export_module(tuned, tmp_path / "m", source_module=str(tmp_path / "nothing-here"))


# --- real data -------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_module_export_round_trip(real_data, tmp_path):
    """MobileNetV2 0.35 on 24 real photos: the export computes the vectors the run cached, and
    hub.KerasLayer exposes its 156 trainable weights. (A fine-tuned run of the real module costs
    another ~15 s of tracing the training step, beyond this test's budget; the fine-tuned path is
    the tiny batch-norm module's tests above.)"""
    import tensorflow as tf
    import tensorflow_hub as hub
    import tf_keras

    from retrain.data.dataset import scan_folder
    from retrain.data.images import load_image
    from retrain.features.bottlenecks import BottleneckCache
    from retrain.features.module import InputSpec

    images = tmp_path / "images"
    for name in ("cats", "dogs"):
        (images / name).mkdir(parents=True)
        for photo in sorted((SHARED_DATA / "cats_and_dogs_filtered" / "train" / name).iterdir())[:12]:
            (images / name / photo.name).symlink_to(photo)  # the shared data stays where it is
    run = retrain.train(images, str(REAL_MODULE), tmp_path / "out", cache_dir=str(tmp_path / "cache"), quantize=(),
                        test_percent=0)
    result = export_module(tmp_path / "out", tmp_path / "module", license="Apache 2.0")
    assert result.variables == 260 and result.trainable_variables == 156 and result.feature_dim == 1280
    assert result.variables_changed == 0 and result.checks["trainable_statistics"] == []
    assert result.checks["max_abs_diff_features"] <= 1e-4 * max(1.0, result.checks["feature_scale"])
    assert result.checks["max_abs_diff_probabilities"] <= 1e-5

    files = scan_folder(images).images
    spec = InputSpec(224, 224)
    cached = BottleneckCache(tmp_path / "cache", run.module["fingerprint"], spec.key()).lookup([i.content_hash for i in files])
    assert len(cached) == 24
    pixels = np.stack([load_image(i.path, 224, 224) for i in files]).astype(np.float32) / 255.0
    vectors = hub.load(str(tmp_path / "module"))(tf.constant(pixels), training=False).numpy()
    expected = np.stack([cached[i.content_hash] for i in files])
    assert np.abs(vectors - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))

    layer = hub.KerasLayer(str(tmp_path / "module"), trainable=True)
    model = tf_keras.Sequential([tf_keras.Input((224, 224, 3)), layer, tf_keras.layers.Dense(2)])
    assert len(layer.trainable_weights) == 156
    assert not [w.name for w in layer.trainable_weights if "moving_" in w.name]
    assert len([w for w in layer.non_trainable_weights if "moving_" in w.name]) == 104
    assert model(pixels[:2]).shape == (2, 2)
