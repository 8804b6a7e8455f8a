"""Part 8: ``predict`` and ``evaluate`` on a .tflite file without TensorFlow.

    python -m bench.run --only tflite-predict       # or: python -m bench.tflite_predict [--data DIR]

A float32 .tflite file is trained on a few images per class of ``--images`` (links to the first
``FEW_PER_CLASS``), then:

* agreement: top-1 of ``retrain predict MODEL.tflite VALIDATION --json`` (a fresh process, which
  must not import TensorFlow: checked from ``python -X importtime``) against the same LiteRT file
  fed by TensorFlow's decode and resize (``iter_image_batches(tensorflow=True)``, the path
  ``predict`` took before), on every image of the validation folder beside ``--images``; also how
  many images got the very same pixels, and ``retrain evaluate --json`` against the TensorFlow
  path's accuracy;
* start-up: ``python -c "import tensorflow"`` against ``retrain predict MODEL.tflite ONE.jpg``, each
  run ``ROUNDS`` times, interleaved; the ratio of the medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from .common import BenchError, Context, Row, python_env, retrain_train, run_json, run_python

FEW_PER_CLASS = 20
ROUNDS = 7
AGREEMENT_TARGET = 0.995
RATIO_TARGET = 5.0


def _few_images(ctx: Context) -> Path:
    from retrain.data.dataset import list_classes

    folder = ctx.work / f"images-{FEW_PER_CLASS}-per-class"
    for name in list_classes(ctx.images):
        (folder / name).mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in (ctx.images / name).iterdir() if p.is_file() and not p.name.startswith("."))
        for path in files[:FEW_PER_CLASS]:
            (folder / name / path.name).symlink_to(path)
    return folder


def _validation(ctx: Context) -> Path:
    folder = ctx.images.parent / "validation"
    if not folder.is_dir():
        raise BenchError(f"no validation folder beside {ctx.images} (expected {folder})")
    return folder


def _tensorflow_path(model: Path, paths: list[str]):
    """Top-1 and pixels of each file through TensorFlow's decode and resize, run by the same LiteRT file."""
    import numpy as np

    from retrain.data.images import iter_image_batches, probe_image
    from retrain.evaluation.runner import TFLiteRunner

    runner = TFLiteRunner(model)
    decoders = []
    for path in paths:
        with open(path, "rb") as handle:
            decoders.append(probe_image(handle.read()).decoder)
    top1, pixels = {}, {}
    for tensorflow in (True, False):
        for indices, batch, skipped in iter_image_batches(paths, decoders, runner.height, runner.width, 64,
                                                          tensorflow=tensorflow):
            if skipped:
                raise BenchError(f"{len(skipped)} validation file(s) could not be decoded: {skipped[0]}")
            if tensorflow:
                for index, row in zip(indices.tolist(), runner.predict(batch)):
                    top1[paths[index]] = runner.classes[int(np.argmax(row))]
            for index, image in zip(indices.tolist(), batch):
                pixels.setdefault(paths[index], []).append(image)
    same_pixels = sum(1 for a, b in pixels.values() if np.array_equal(a, b))
    return top1, same_pixels


def _imports_tensorflow(stderr: str) -> list[str]:
    """Module names under ``tensorflow`` in ``python -X importtime`` output."""
    names = [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    return [n for n in names if n == "tensorflow" or n.startswith("tensorflow.")]


def _timed(args: list[str], what: str) -> float:
    _, wall, _ = run_python(args, what, env=python_env())
    return wall


def run(ctx: Context) -> tuple[dict, list[Row]]:
    from retrain.evaluation.evaluate import expand_inputs

    validation = _validation(ctx)
    output = ctx.work / "out-tflite-predict"
    _, train_wall, _ = retrain_train(_few_images(ctx), ctx.module, output, ctx.work / "cache-tflite-predict",
                                     "--quantize", "none")
    model = output / "model.tflite"
    paths = expand_inputs([validation])

    # The new path, as a user runs it: one process, its imports listed.
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "retrain", "predict", str(model), str(validation),
                           "--json"], capture_output=True, text=True, env=python_env(), check=False)
    if done.returncode != 0:
        raise BenchError(f"retrain predict failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    leaked = _imports_tensorflow(done.stderr)
    if leaked:
        raise BenchError(f"retrain predict on a .tflite file imported TensorFlow ({leaked[0]} ...)")
    predicted = {}
    for line in done.stdout.splitlines():
        item = json.loads(line)
        if item["error"]:
            raise BenchError(f"retrain predict skipped {item['path']}: {item['error']}")
        predicted[item["path"]] = item["top"][0]["class"]
    reference, same_pixels = _tensorflow_path(model, paths)
    if set(predicted) != set(reference):
        raise BenchError("retrain predict and the TensorFlow path saw different files")
    agree = sum(predicted[p] == reference[p] for p in paths) / len(paths)

    evaluation, _, _ = run_json(["-m", "retrain", "evaluate", str(model), str(validation), "--json"], "retrain evaluate")
    truth = {p: Path(p).parent.name for p in paths}
    reference_accuracy = sum(reference[p] == truth[p] for p in paths) / len(paths)

    # Start-up: interleaved, so a change in the machine's load touches both alike.
    one = paths[0]
    tensorflow_s, predict_s = [], []
    for _ in range(ROUNDS):
        tensorflow_s.append(_timed(["-c", "import tensorflow"], "python -c 'import tensorflow'"))
        predict_s.append(_timed(["-m", "retrain", "predict", str(model), one, "--quiet"], "retrain predict"))
    tensorflow_median, predict_median = statistics.median(tensorflow_s), statistics.median(predict_s)
    ratio = tensorflow_median / predict_median

    details = {
        "model": str(model), "train_images_per_class": FEW_PER_CLASS, "train_wall": round(train_wall, 2),
        "validation": str(validation), "images": len(paths), "top1_agreement": agree,
        "same_pixels": same_pixels, "accuracy_without_tensorflow": evaluation["accuracy"],
        "accuracy_tensorflow_path": reference_accuracy, "predict_imports_tensorflow": False,
        "rounds": ROUNDS, "import_tensorflow_s": [round(t, 3) for t in tensorflow_s],
        "predict_one_image_s": [round(t, 3) for t in predict_s],
        "import_tensorflow_median_s": round(tensorflow_median, 3), "predict_median_s": round(predict_median, 3),
        "ratio": round(ratio, 2), "commands": {
            "tensorflow": f"{sys.executable} -c 'import tensorflow'",
            "predict": f"{sys.executable} -m retrain predict {model} {one} --quiet"},
    }
    rows = [
        Row("8 tflite-predict", f"top-1 agreement with the TensorFlow decode path, {len(paths)} validation images "
                                f"({same_pixels} with identical pixels)", f"{100 * agree:.1f} %",
            f"≥ {100 * AGREEMENT_TARGET:.1f} %", agree >= AGREEMENT_TARGET),
        Row("8 tflite-predict", "accuracy, evaluate without TensorFlow / TensorFlow path",
            f"{evaluation['accuracy']:.4f} / {reference_accuracy:.4f}"),
        Row("8 tflite-predict", f"import tensorflow / predict one image, medians of {ROUNDS} "
                                f"({tensorflow_median:.2f} s / {predict_median:.2f} s)", f"{ratio:.1f}×",
            f"≥ {RATIO_TARGET:.0f}×", ratio >= RATIO_TARGET),
    ]
    return details, rows


def main(argv=None) -> int:
    """This part alone: ``python -m bench.tflite_predict``, with bench.run's data options."""
    from .run import main as run_main

    return run_main(["--only", "tflite-predict", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
