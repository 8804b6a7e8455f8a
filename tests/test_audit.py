"""Modules are programs: the op audit refuses modules that reach outside their tensors, before any
of the module runs and before any image is read; unusual but harmless modules still load."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrain.cli import main
from retrain.errors import ModuleError
from retrain.features.audit import CHECKPOINT_OPS, REFUSED_OPS, audit_module
from retrain.features.module import load_module

FAST = ["--epochs", "30", "--learning-rate", "0.05", "--quantize", "none"]

# Registered ops whose names sound like input/output but stay inside their tensors (reviewed one
# by one): summaries build protos in memory, memory caches, TPU embedding tables loaded from
# tensors, in-memory TensorArrays, string formatting of checkpoint names, gradient identities.
REVIEWED_HARMLESS = set("""
    AnonymousMemoryCache AudioSummary AudioSummaryV2 BoostedTreesExampleDebugOutputs BoostedTreesMakeStatsSummary
    DebugGradientIdentity DebugGradientRefIdentity DeleteMemoryCache DeleteRpcFutureResource DummyMemoryCache
    ExperimentalStatsAggregatorSummary HistogramSummary ImageSummary MergeSummary ScalarSummary ShardedFilename
    ShardedFilespec StatsAggregatorSummary TensorArrayWrite TensorArrayWriteV2 TensorArrayWriteV3 TensorSummary
    TensorSummaryV2
""".split())
SOUNDS_LIKE_IO = re.compile(r"File|Reader|Write|Save|Restore|Print|PyFunc|Rpc|Summary|Sql|LMDB|TFRecord|TextLine|"
                            r"FixedLengthRecord|Snapshot|Debug|Dump|Checkpoint|Remote|DataService|Socket|Load|Cache|Record")


def registered_ops() -> set[str]:
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session

    buffer = pywrap_tf_session.TF_GetAllOpList()
    return {op.name for op in op_def_pb2.OpList.FromString(pywrap_tf_session.TF_GetBuffer(buffer)).op}


def save_odd_module(path: Path, kind: str, target: Path) -> str:
    """A tiny feature-vector module whose ``__call__`` also does ``kind`` (mean colour + 5 features)."""
    import tensorflow as tf

    def printed(i, images):
        tf.print("batch", tf.shape(images))
        return i + 1

    class Odd(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32), tf.TensorSpec([], tf.bool)])
        def __call__(self, images, training=False):
            colour = tf.reduce_mean(images, [1, 2])
            extra = tf.zeros([tf.shape(images)[0], 1])
            if kind == "write":  # inside a branch: the audit must follow nested functions
                def write():
                    tf.io.write_file(str(target), tf.strings.as_string(tf.reduce_sum(images)))
                    return tf.constant(1.0)

                extra += tf.cond(tf.reduce_sum(images) >= 0, write, lambda: tf.constant(0.0))
            elif kind == "read":
                extra += tf.cast(tf.strings.length(tf.io.read_file(str(target))), tf.float32) * 0
            elif kind == "print":  # inside a loop body
                tf.while_loop(lambda i: i < 2, lambda i: printed(i, images), [tf.constant(0)])
            elif kind == "list":
                extra += tf.cast(tf.size(tf.io.matching_files(str(target.parent / "*"))), tf.float32) * 0
            elif kind == "python":
                extra += tf.py_function(lambda x: x * 0, [extra], tf.float32)
            elif kind == "checkpoint":  # the saver's op, but in the function a caller runs
                tf.raw_ops.SaveV2(prefix=str(target), tensor_names=["k"], shape_and_slices=[""], tensors=[self.kernel])
            return tf.concat([colour, tf.nn.relu(tf.matmul(colour, self.kernel)), extra], axis=1)[:, :8]

    module = Odd()
    tf.saved_model.save(module, str(path))
    return str(path)


ODD = {"write": "WriteFile", "read": "ReadFile", "print": "PrintV2", "list": "MatchingFiles", "python": "EagerPyFunc",
       "checkpoint": "SaveV2"}


@pytest.fixture(scope="module")
def odd_modules(tmp_path_factory):
    base = tmp_path_factory.mktemp("odd")
    secret = base / "secret" / "token.txt"
    secret.parent.mkdir()
    secret.write_text("not for modules")
    modules = {kind: save_odd_module(base / kind, kind, base / "written.txt" if kind in ("write", "checkpoint") else secret)
               for kind in ODD}
    return modules, base


def test_the_table_names_tensorflow_ops_and_misses_none_that_sound_like_io():
    ops = registered_ops()
    assert not set(REFUSED_OPS) - ops, "refused names that are not TensorFlow ops (typos?)"
    tpu_tables = {op for op in ops if re.match(r"Load(All)?TPUEmbedding", op)}  # TPU memory, from tensors
    unreviewed = {op for op in ops if SOUNDS_LIKE_IO.search(op)} - set(REFUSED_OPS) - REVIEWED_HARMLESS - tpu_tables
    assert not unreviewed, f"review these ops and refuse them or list them as harmless: {sorted(unreviewed)}"
    assert {"ReadFile", "WriteFile", "PrintV2"} <= set(REFUSED_OPS)  # saved_model_cli scan's three
    assert CHECKPOINT_OPS <= set(REFUSED_OPS)


@pytest.mark.parametrize("kind", sorted(ODD))
def test_each_odd_module_is_refused_naming_the_op_and_the_function(odd_modules, kind):
    modules, base = odd_modules
    with pytest.raises(ModuleError) as caught:
        audit_module(modules[kind], modules[kind])
    message = str(caught.value)
    assert "\n" not in message
    assert f"runs op {ODD[kind]}" in message and "__call__" in message
    assert f"--allow-module-op {ODD[kind]}" in message
    assert not (base / "written.txt").exists()


def test_train_refuses_before_any_image_is_read_and_writes_nothing(odd_modules, colour_dir, tmp_path, monkeypatch):
    import retrain.data.dataset as dataset
    import retrain.pipeline as pipeline

    modules, base = odd_modules
    calls = []
    monkeypatch.setattr(pipeline, "split_dataset", lambda *a, **k: calls.append(a) or dataset.split_dataset(*a, **k))
    for kind in ("write", "read"):
        out, cache = tmp_path / f"out-{kind}", tmp_path / f"cache-{kind}"
        result = CliRunner().invoke(main, ["train", str(colour_dir), "--module", modules[kind], "--output", str(out),
                                           "--cache-dir", str(cache), *FAST])
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and f"runs op {ODD[kind]}" in errors[0], result.output
        assert "Traceback" not in result.output
        assert not out.exists() and not cache.exists()
    assert calls == [], "the image folder was scanned before the module was refused"
    assert not (base / "written.txt").exists()


def test_an_accepted_op_is_recorded_and_the_model_runs_again(odd_modules, colour_dir, tmp_path):
    modules, _ = odd_modules
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train", str(colour_dir), "--module", modules["read"], "--output", str(out),
                                       "--cache-dir", str(tmp_path / "cache"), "--allow-module-op", "ReadFile", *FAST])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["allowed_module_ops"] == ["ReadFile"]
    assert run["module"]["audit"]["accepted_ops"] == ["ReadFile"]
    evaluated = CliRunner().invoke(main, ["evaluate", str(out), str(colour_dir), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    # The same SavedModel without the run that accepted the op: refused like a module.
    bare = tmp_path / "bare" / "saved_model"
    shutil.copytree(out / "saved_model", bare)
    refused = CliRunner().invoke(main, ["evaluate", str(bare), str(colour_dir)])
    assert refused.exit_code == 1
    assert "model" in refused.output and "runs op ReadFile" in refused.output and "Traceback" not in refused.output


def test_a_mistyped_op_name_accepts_nothing(colour_dir, tiny_module, tmp_path):
    result = CliRunner().invoke(main, ["train", str(colour_dir), "--module", tiny_module, "--output", str(tmp_path / "o"),
                                       "--allow-module-op", "readfile"])
    assert result.exit_code == 1
    assert "did you mean ReadFile" in result.output and not (tmp_path / "o").exists()


def test_the_saver_may_use_checkpoint_ops_but_nothing_else_may(tiny_module, odd_modules):
    result = audit_module(tiny_module)  # its saver functions hold SaveV2 / RestoreV2 / MergeV2Checkpoints
    assert result.functions > 0 and result.accepted == ()
    assert {"SaveV2", "RestoreV2"} <= set(result.ops)
    modules, _ = odd_modules
    with pytest.raises(ModuleError, match="__call__ runs op SaveV2"):
        audit_module(modules["checkpoint"])


def _keras_model():
    import keras

    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(6, 1, activation="relu")(inputs))
    return keras.Model(inputs, pooled)


def test_unusual_but_harmless_modules_still_load(tmp_path):
    import tensorflow as tf

    _keras_model().export(str(tmp_path / "keras_export"), format="tf_saved_model", verbose=False)  # a `serve` endpoint
    tf.saved_model.save(_keras_model(), str(tmp_path / "keras_saved"))

    class Plain(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)])
        def __call__(self, images):
            return tf.reduce_mean(images, [1, 2]) * 2.0

    tf.saved_model.save(Plain(), str(tmp_path / "plain"))
    for name, dim in (("keras_export", 6), ("keras_saved", 6), ("plain", 3)):
        loaded = load_module(str(tmp_path / name))
        assert loaded.info.feature_dim == dim, name
        assert loaded.info.audit["functions"] > 0 and loaded.info.audit["accepted_ops"] == []
        vectors = loaded.pixel_features(tf.constant(np.full((2, 16, 16, 3), 255, np.uint8))).numpy()
        assert vectors.shape == (2, dim) and np.isfinite(vectors).all()


def test_the_readme_counts_the_refused_ops():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{len(REFUSED_OPS)} ops in six groups" in readme
