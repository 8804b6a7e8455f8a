"""Issue-level checks of the on-device files: every format converts, runs, sums to 1, carries its
labels, is checked right after it is written, and a lossy variant is reported loudly."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import retrain
import retrain.api
import retrain.serving.checks
from retrain.cli import main
from retrain.serving.tflite import TFLITE_FORMATS, read_tflite_labels
from retrain.evaluation.runner import TFLiteRunner

FAST = dict(epochs=40, learning_rate=0.05, patience=10)
# Largest probability difference from the SavedModel each format may show (quantization noise).
MAX_ABS_DIFF = {"float32": 1e-4, "float16": 5e-3, "dynamic": 0.05, "int8": 0.05, "int8-full": 0.1}


@pytest.fixture(scope="module")
def all_formats(tiny_module, colour_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("formats") / "out"
    result = retrain.train(colour_dir, tiny_module, out, cache_dir=str(tmp_path_factory.mktemp("c")),
                           quantize=("int8", "float16", "dynamic", "int8-full"), **FAST)
    return result, out


@pytest.mark.parametrize("name", list(TFLITE_FORMATS))
def test_each_format_runs_and_sums_to_one(all_formats, name):
    result, out = all_formats
    path = out / TFLITE_FORMATS[name].filename
    runner = TFLiteRunner(path)
    assert (runner.height, runner.width) == (32, 32)
    assert runner.classes == ["blue", "green", "red"]
    assert read_tflite_labels(path) == ["blue", "green", "red"]
    red = np.zeros((4, 32, 32, 3), np.uint8)
    red[..., 0] = 220
    probabilities = runner.predict(red)
    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=0.02 if name == "int8-full" else 1e-5)
    figures = result.metrics["tflite"][name]
    assert figures["file"] == path.name and figures["size_bytes"] == path.stat().st_size
    assert figures["n_images"] == result.split["test"]
    assert figures["ms_per_image"] > 0
    # each format against its own tolerances: on the test split as written, and on every image here
    assert figures["agreement"] >= TFLITE_FORMATS[name].agreement_tolerance
    assert figures["max_abs_diff"] <= MAX_ABS_DIFF[name]
    assert result.metrics["tflite"]["float32"]["accuracy"] - figures["accuracy"] <= 0.02
    from retrain.evaluation.runner import SavedModelRunner
    from tiny_modules import colour_pixels

    pixels = colour_pixels(result.classes)
    reference = SavedModelRunner(out / "saved_model").predict(pixels)
    mine = runner.predict(pixels)
    assert (mine.argmax(1) == reference.argmax(1)).mean() >= TFLITE_FORMATS[name].agreement_tolerance
    assert np.abs(mine - reference).max() <= MAX_ABS_DIFF[name]


def test_int8_full_file_is_full_integer(all_formats):
    _, out = all_formats
    runner = TFLiteRunner(out / "model_int8_full.tflite")
    details = runner.interpreter.get_input_details()[0], runner.interpreter.get_output_details()[0]
    assert [d["dtype"] for d in details] == [np.uint8, np.uint8]


def test_int8_file_takes_uint8_and_holds_int8_weights(all_formats):
    """The default int8 file (serving/mixed.py): uint8 images in, float probabilities out, int8
    weights (the tiny module's two weighted ops are both late: the real module's early ones are
    float16, tests/test_realdata.py)."""
    from ai_edge_litert.tools import flatbuffer_utils

    from retrain.serving.mixed import weighted_ops

    _, out = all_formats
    runner = TFLiteRunner(out / "model_int8.tflite")
    details = runner.interpreter.get_input_details()[0], runner.interpreter.get_output_details()[0]
    assert [d["dtype"] for d in details] == [np.uint8, np.float32]
    assert np.int8 in {t["dtype"] for t in runner.interpreter.get_tensor_details()}
    plain = flatbuffer_utils.read_model_from_bytearray(bytearray((out / "model.tflite").read_bytes()))
    assert [name for name, _, _ in weighted_ops(plain)] == ["CONV_2D", "FULLY_CONNECTED"]  # the module's, the head


def test_the_compact_recipe_gives_int8_from_the_output_back_until_the_share_is_reached():
    from retrain.serving.mixed import compact_recipe

    ops = [("CONV_2D", "first", 100), ("DEPTHWISE_CONV_2D", "second", 10), ("CONV_2D", "wide;late", 500),
           ("FULLY_CONNECTED", "head", 400)]
    recipe, summary = compact_recipe(ops, 0.7)
    assert recipe[0]["regex"] == ".*" and recipe[0]["algorithm_key"] == "float_casting"  # float16 by default
    int8 = [(r["regex"], r["operation"]) for r in recipe[1:]]
    assert int8 == [("^head$", "FULLY_CONNECTED"), ("^wide;late$", "CONV_2D")]
    assert all(r["op_config"]["weight_tensor_config"]["num_bits"] == 8 for r in recipe[1:])
    assert summary == {"int8_ops": 2, "float16_ops": 2, "int8_weight_share": round(900 / 1010, 3)}
    assert compact_recipe(ops, 0.0)[1]["int8_ops"] == 0 and compact_recipe(ops, 1.0)[1]["int8_ops"] == 4


def test_model_card_lists_module_metrics_and_its_snippets_run(all_formats, tiny_module, colour_dir, tmp_path):
    result, out = all_formats
    card = (out / "README.md").read_text()
    assert result.module["fingerprint"] in card and str(tiny_module) in card
    for name in TFLITE_FORMATS:
        assert f"`{TFLITE_FORMATS[name].filename}`" in card
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 3  # SavedModel, serving_bytes, LiteRT
    # A photo-like image (texture, edges, far larger than the module's 32x32), so that resizing
    # matters: each snippet must print what the tool predicts, to the printed digits. PNG, so that
    # two JPEG decoders' rounding (TensorFlow's, Pillow's) does not blur the check of the resize.
    from PIL import Image

    rng = np.random.default_rng(4)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    photo = np.asarray(Image.fromarray(coarse).resize((400, 300), Image.NEAREST), np.int16)
    photo = np.clip(photo + rng.normal(0, 25, photo.shape), 0, 255).astype(np.uint8)
    photo[:, :, 0] = np.maximum(photo[:, :, 0], 140)  # reddish, so the head has an opinion
    Image.fromarray(photo).save(out / "photo.jpg", format="PNG")  # the snippets open photo.jpg
    try:
        expected = retrain.predict(out, [out / "photo.jpg"])[0].top[0]
        tflite_expected = retrain.predict(out / "model.tflite", [out / "photo.jpg"])[0].top[0]
        for code, want in zip(snippets, (expected, expected, tflite_expected), strict=True):
            run = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            name, probability = run.stdout.split()
            assert name == want["class"] and float(probability) == pytest.approx(want["probability"], abs=1e-5)
    finally:
        (out / "photo.jpg").unlink()


def test_lossy_variant_is_reported_loudly(tiny_module, colour_dir, tmp_path, monkeypatch):
    from retrain.serving import checks

    real_check = checks.tflite_figures

    def pessimistic(path, reference, pixels, labels):
        figures = real_check(path, reference, pixels, labels)
        if "int8" in path.name:
            figures["accuracy"] -= 0.5
        return figures

    monkeypatch.setattr(checks, "tflite_figures", pessimistic)
    result = CliRunner().invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(tmp_path / "o"),
                                       "--cache-dir", str(tmp_path / "c"), "--json", "--epochs", "40", "--learning-rate", "0.05"])
    assert result.exit_code == 0, result.output
    assert "WARNING: TFLITE INT8 LOSES 50.0 ACCURACY POINTS" in result.stderr
    data = json.loads(result.stdout)
    assert data["metrics"]["tflite"]["int8"]["accuracy_drop_points"] == pytest.approx(50.0)
    assert any("INT8 LOSES" in w for w in data["warnings"])


def test_export_command_writes_and_checks_formats(all_formats, tmp_path):
    _, out = all_formats
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "model_float16.tflite").unlink()
    result = CliRunner().invoke(main, ["export", str(copy), "--format", "tflite-float16", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["artifacts"]["float16"] == str(copy / "model_float16.tflite")
    assert data["tflite"]["float16"]["agreement"] >= 0.99
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["tflite"]["float16"]["file"] == "model_float16.tflite"
    assert not list(copy.glob(".export-*"))


def test_evaluate_report_for_tflite_and_saved_model(all_formats, colour_dir, tmp_path):
    _, out = all_formats
    for model in (out / "model_int8.tflite", out / "saved_model"):
        report = tmp_path / model.name
        result = CliRunner().invoke(main, ["evaluate", str(model), str(colour_dir), "--report", str(report), "--json"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["report"] == str(report / "index.html")
        for name in ("index.html", "confusion_matrix.png", "confusion_matrix.csv", "per_class.csv", "report.json"):
            assert (report / name).exists(), name
        assert str(model) in (report / "index.html").read_text()


def test_export_int8_full_calibrates_on_training_images_only(all_formats, tmp_path, monkeypatch):
    result, out = all_formats
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    seen = []
    real = retrain.api.representative_images

    def spy(images, *args):
        seen.extend(images)
        return real(images, *args)

    monkeypatch.setattr(retrain.api, "representative_images", spy)
    retrain.export(copy, ["int8-full"])
    split = retrain.api.split_dataset(json.loads((copy / "run.json").read_text())["image_dir"])
    assert {i.path for i in seen} == {i.path for i in split.train}


def test_one_reused_converter_writes_the_same_files_as_fresh_ones(all_formats, tmp_path):
    from retrain.serving.tflite import export_tflite, tflite_converter

    _, out = all_formats
    saved_model = out / "saved_model"
    rng = np.random.default_rng(0)
    representative = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
    labels = ["blue", "green", "red"]
    order = ["int8-full", "int8", "float16", "dynamic", "float32"]  # int8-full first: its settings must not leak
    shared = tflite_converter(saved_model)
    metadata = {"name": "test", "description": "d", "version": "0", "height": 32, "width": 32,
                "input_description": "i", "output_description": "o"}
    for name in order:
        reused = export_tflite(saved_model, tmp_path / f"reused_{name}.tflite", name, labels, representative,
                               metadata, converter=shared)
        fresh = export_tflite(saved_model, tmp_path / f"fresh_{name}.tflite", name, labels, representative, metadata)
        _same_tensors(reused, fresh)


def _same_tensors(a, b) -> None:
    """Same graph tensors, quantization and constant values (the bytes may differ in generated names)."""
    from ai_edge_litert.interpreter import Interpreter

    first, second = Interpreter(str(a)), Interpreter(str(b))  # not allocated: only constants have data
    pairs = list(zip(first.get_tensor_details(), second.get_tensor_details(), strict=True))
    compared = 0
    for x, y in pairs:
        assert (list(x["shape"]), x["dtype"], x["quantization"]) == (list(y["shape"]), y["dtype"], y["quantization"])
        try:
            value = first.get_tensor(x["index"])
        except ValueError:  # no data before allocation: not a constant
            continue
        np.testing.assert_array_equal(value, second.get_tensor(y["index"]))
        compared += 1
    assert compared > 0
