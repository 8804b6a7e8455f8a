"""End to end on real data with the real module, through the README's own commands.

Marked ``realdata``: these read ../shared/data (RETRAIN_SHARED_DATA) and fail, not skip, when it
is missing.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA

pytestmark = pytest.mark.realdata


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- tested by tests/test_realdata.py: each", 1)[1].split("```", 2)[1]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("retrain ")]


def run(command: str, out: Path, cache: Path) -> subprocess.CompletedProcess:
    command = command.replace("../shared/data", str(SHARED_DATA)).replace("out/", f"{out}/")
    args = shlex.split(command)
    env = {**os.environ, "RETRAIN_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "retrain", *args[1:]], capture_output=True, text=True, env=env, cwd=ROOT)


def test_readme_quick_start_on_cats_and_dogs(real_data, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["train", "evaluate", "evaluate", "predict", "train"]
    assert commands[4] == commands[0].replace(" --json", " --overwrite --json")

    first = run(commands[0], out, cache)
    assert first.returncode == 0, first.stderr
    trained = json.loads(first.stdout)
    assert trained["classes"] == ["cats", "dogs"]
    assert trained["cache"]["misses"] == 2000
    assert trained["metrics"]["test"]["accuracy"] >= 0.90
    tflite = trained["metrics"]["tflite"]
    assert tflite["float32"]["agreement"] >= 0.995
    # int8 is written by default (serving/mixed.py): int8 weights in the late layers, float16 in
    # the early ones; within a point of float32, agreeing on 95 % of the test images, at most 40 %
    # of float32's size.
    assert tflite["int8"]["size_bytes"] <= 0.40 * tflite["float32"]["size_bytes"]
    assert tflite["float32"]["accuracy"] - tflite["int8"]["accuracy"] <= 0.01
    assert tflite["int8"]["agreement"] >= 0.95
    from ai_edge_litert.interpreter import Interpreter

    kinds = {d["dtype"] for d in Interpreter(model_path=str(out / "model_int8.tflite")).get_tensor_details()}
    assert np.int8 in kinds and np.float16 in kinds
    assert not trained["warnings"]
    assert trained["skipped"] == []

    evaluated = run(commands[1], out, cache)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["n_images"] == 1000 and report["accuracy"] >= 0.90

    tflite = run(commands[2], out, cache)
    assert tflite.returncode == 0, tflite.stderr
    accuracy = float(re.search(r"accuracy (\d\.\d+) \(95% CI \d\.\d+-\d\.\d+, 1000 images\)", tflite.stdout).group(1))
    assert accuracy >= 0.90 and abs(accuracy - report["accuracy"]) <= 0.005

    predicted = run(commands[3], out, cache)
    assert predicted.returncode == 0, predicted.stderr
    assert re.match(r".*cat\.2000\.jpg: cats \d\.\d{4}, dogs \d\.\d{4}$", predicted.stdout.strip())
    _model_card_snippets_agree_on_a_real_photo(out, SHARED_DATA / "cats_and_dogs_filtered" / "validation" / "dogs" / "dog.2003.jpg")

    second = run(commands[4], out, cache)
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert (again["cache"]["hits"], again["cache"]["misses"]) == (2000, 0)
    assert again["timings"]["bottlenecks"] * 20 <= trained["timings"]["bottlenecks"]
    assert again["metrics"]["test"]["accuracy"] == trained["metrics"]["test"]["accuracy"]


def test_readme_python_example(real_data, tmp_path):
    text = (ROOT / "README.md").read_text()
    code = text.split("<!-- tested by tests/test_realdata.py: this block", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = code.replace("../shared/data", str(SHARED_DATA)).replace('"out/', f'"{tmp_path}/out/')
    env = {**os.environ, "RETRAIN_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert float(lines[0].split()[0]) >= 0.8  # test accuracy on the drawn shapes
    assert "'misses': 90" in lines[0]
    assert lines[-1].startswith("sample_data/circle/circle_000.jpg [{'class': ")
    assert (tmp_path / "out" / "shapes" / "model.tflite").exists()


def _model_card_snippets_agree_on_a_real_photo(out: Path, photo: Path) -> None:
    """The three snippets of the model card (SavedModel, serving_bytes, LiteRT) on a real 500x375-ish photo name the
    class the tool predicts, with its probability (to JPEG decoders' rounding: Pillow in the
    snippets, TensorFlow in the tool)."""
    import shutil

    import retrain

    card = (out / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 3  # SavedModel, serving_bytes, LiteRT
    shutil.copy(photo, out / "photo.jpg")
    try:
        saved_model = retrain.predict(out, [photo])[0].top[0]
        wanted = [saved_model, saved_model, retrain.predict(out / "model.tflite", [photo])[0].top[0]]
        for code, want in zip(snippets, wanted, strict=True):
            done = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            name, probability = done.stdout.split()
            assert name == want["class"] and abs(float(probability) - want["probability"]) < 0.01
    finally:
        (out / "photo.jpg").unlink()
