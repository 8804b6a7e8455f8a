"""``predict`` and ``evaluate`` on a .tflite file never import TensorFlow, and see TensorFlow's pixels.

The commands run in a subprocess behind a guard (an import hook) that ends the process, with
the importer's stack, at the first import of ``tensorflow``; their results are compared with
the same .tflite file fed by TensorFlow's decode and resize, which is what they did before.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrain
from retrain.data.images import (
    bilinear_float32,
    decode_as_tensorflow_does,
    iter_image_batches,
    probe_image,
    resize_bilinear_numpy,
)
from retrain.evaluation.evaluate import evaluate_runner, predict_runner
from retrain.evaluation.runner import TFLiteRunner

ROOT = Path(__file__).resolve().parents[1]
TENSORFLOW_IMPORTED = 97  # the guard's exit code

GUARD = r'''
import os, sys, traceback

BLOCKED = [name for name in os.environ.get("GUARD_BLOCK", "").split(",") if name]
STDERR = os.dup(2)  # retrain points fd 2 elsewhere while TensorFlow starts: the guard's words must still show


class Guard:
    """TensorFlow imported: print who did it and end the process. A BLOCKED package: not installed."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top == "tensorflow":
            os.write(STDERR, ("GUARD: tensorflow imported\n" + "".join(traceback.format_stack())).encode())
            os._exit(97)
        if top in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Guard())
sys.argv = ["retrain", *sys.argv[1:]]
from retrain.cli import run

run()
'''


def guarded(tmp_path, *args, block: str = "") -> subprocess.CompletedProcess:
    """``retrain ARGS`` in a fresh process that fails if TensorFlow is imported."""
    script = tmp_path / "guarded_retrain.py"
    script.write_text(GUARD)
    env = dict(os.environ, GUARD_BLOCK=block, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


class TensorFlowDecoded(TFLiteRunner):
    """The same .tflite file fed by TensorFlow's decode and resize: how predict / evaluate ran it before."""

    uses_tensorflow = True


# ----------------------------------------------------------------------------- test images


def photo(colour, size, seed) -> np.ndarray:
    """A coarse random pattern tinted towards a class colour, upscaled and noisy: resizing matters."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3)).astype(np.float32)
    coarse = 0.4 * coarse + 0.6 * np.asarray(colour, np.float32)
    base = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.NEAREST), np.float32)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def exif6() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


KINDS = {
    # name: (pixels -> bytes, extension); sizes below go up, down and off the aspect ratio
    "jpeg420": (lambda p: encode(Image.fromarray(p), "JPEG", quality=90), "jpg"),
    "jpeg444": (lambda p: encode(Image.fromarray(p), "JPEG", quality=75, subsampling=0), "jpg"),
    "progressive": (lambda p: encode(Image.fromarray(p), "JPEG", progressive=True), "jpg"),
    "grey_jpeg": (lambda p: encode(Image.fromarray(p).convert("L"), "JPEG"), "jpg"),
    "exif_rotated": (lambda p: encode(Image.fromarray(p), "JPEG", quality=92, exif=exif6()), "jpg"),
    "cmyk_jpeg": (lambda p: encode(Image.fromarray(p).convert("CMYK"), "JPEG", quality=92), "jpg"),
    "png": (lambda p: encode(Image.fromarray(p), "PNG"), "png"),
    "palette_png": (lambda p: encode(Image.fromarray(p).quantize(64), "PNG"), "png"),
    "grey16_png": (lambda p: encode(Image.fromarray(p[..., 0].astype(np.uint16) * 257), "PNG"), "png"),
    "rgba_png": (lambda p: encode(Image.fromarray(np.dstack([p, p[..., :1]])), "PNG"), "png"),
    "gif": (lambda p: encode(Image.fromarray(p), "GIF"), "gif"),
    "webp": (lambda p: encode(Image.fromarray(p), "WEBP", quality=90), "webp"),
}
SIZES = [(61, 47), (300, 200), (20, 33), (32, 32), (500, 375)]
CLASSES = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


@pytest.fixture(scope="module")
def model(tiny_module, colour_dir, tmp_path_factory):
    """A float32 .tflite file from the tiny module (classes blue, green, red)."""
    out = tmp_path_factory.mktemp("no-tf") / "out"
    retrain.train(colour_dir, tiny_module, out, cache_dir=str(tmp_path_factory.mktemp("cache")), quantize=(),
                  epochs=40, learning_rate=0.05, patience=10)
    return out / "model.tflite"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Every kind of file, three classes, several sizes; one truncated JPEG and one non-image."""
    root = tmp_path_factory.mktemp("kinds")
    seed = 0
    for name, colour in CLASSES.items():
        (root / name).mkdir()
        for kind, (make, extension) in KINDS.items():
            size = SIZES[seed % len(SIZES)]
            (root / name / f"{kind}_{seed}.{extension}").write_bytes(make(photo(colour, size, seed)))
            seed += 1
    cut = encode(Image.fromarray(photo(CLASSES["red"], (64, 64), 99)), "JPEG", quality=95)
    (root / "red" / "truncated.jpg").write_bytes(cut[: len(cut) // 2])
    (root / "blue" / "not_an_image.png").write_bytes(b"not a png at all\n")
    return root


def files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the same pixels


def test_pixels_without_tensorflow_are_tensorflow_pixels(image_dir):
    """Every file, decoded and resized without TensorFlow, gives TensorFlow's very pixels."""
    paths = files(image_dir)
    decoders = [probe_image(Path(p).read_bytes()).decoder for p in paths]
    assert {"tf", "pillow"} <= set(decoders)  # both of the pipeline's routes are covered
    seen = {}
    for tensorflow in (True, False):
        pixels, skipped = {}, {}
        for indices, batch, skips in iter_image_batches(paths, decoders, 24, 32, 8, tensorflow=tensorflow):
            pixels.update({paths[i]: image for i, image in zip(indices.tolist(), [] if batch is None else batch)})
            skipped.update({paths[i]: reason for i, reason in skips})
        seen[tensorflow] = pixels, skipped
    (with_tf, skipped_tf), (without_tf, skipped_no_tf) = seen[True], seen[False]
    assert skipped_no_tf == skipped_tf and set(skipped_tf) == {str(image_dir / "red" / "truncated.jpg"),
                                                              str(image_dir / "blue" / "not_an_image.png")}
    assert set(without_tf) == set(with_tf) and len(with_tf) == 3 * len(KINDS)
    different = [p for p in with_tf if not np.array_equal(with_tf[p], without_tf[p])]
    assert different == []


def test_jpeg_decoding_is_tensorflows_not_pillows():
    """TensorFlow decodes JPEG with the fast integer DCT: Pillow's accurate one gives other pixels."""
    import tensorflow as tf

    data = encode(Image.fromarray(photo((200, 100, 50), (120, 90), 5)), "JPEG", quality=85)
    theirs = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False).numpy()
    assert np.array_equal(decode_as_tensorflow_does(data), theirs)
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert not np.array_equal(pillow, theirs)  # why a decoder other than Pillow's is needed at all


# ----------------------------------------------------------------------------- the commands, guarded


def test_predict_on_tflite_never_imports_tensorflow_and_predicts_as_before(model, image_dir, tmp_path):
    paths = files(image_dir)
    done = guarded(tmp_path, "predict", model, *paths, "--json", "--top-k", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GUARD" not in done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    before = predict_runner(TensorFlowDecoded(model), paths, top_k=3)
    assert [g["path"] for g in got] == [b.path for b in before] == paths
    for new, old in zip(got, before):
        assert new["error"] == old.error, new["path"]
        assert [t["class"] for t in new["top"]] == [t["class"] for t in old.top], new["path"]
        np.testing.assert_allclose([t["probability"] for t in new["top"]], [t["probability"] for t in old.top],
                                   atol=1e-6, err_msg=new["path"])
    assert sum(1 for g in got if g["error"]) == 2  # the truncated JPEG and the non-image


def test_evaluate_on_tflite_never_imports_tensorflow_and_scores_as_before(model, image_dir, tmp_path):
    done = guarded(tmp_path, "evaluate", model, image_dir, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GUARD" not in done.stderr
    got = json.loads(done.stdout)
    before = evaluate_runner(TensorFlowDecoded(model), image_dir).to_dict()
    for key in ("accuracy", "n_images", "confusion_matrix", "per_class", "top_k_accuracy", "classes"):
        assert got[key] == before[key], key
    assert sorted(s["path"] for s in got["skipped"]) == sorted(s["path"] for s in before["skipped"])
    assert got["n_images"] == 3 * len(KINDS)


def test_evaluate_report_on_tflite_never_imports_tensorflow(model, image_dir, tmp_path):
    done = guarded(tmp_path, "evaluate", model, image_dir, "--report", tmp_path / "report", "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "report" / "index.html").exists()


def test_without_litert_one_error_line_and_still_no_tensorflow(model, image_dir, tmp_path):
    image = files(image_dir / "red")[0]
    done = guarded(tmp_path, "predict", model, image, block="ai_edge_litert")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == "Error: running a .tflite file needs the LiteRT interpreter: pip install ai-edge-litert"


def test_saved_model_still_runs_through_tensorflow(model, image_dir, tmp_path):
    """The other forms keep TensorFlow's pipeline: the guard stops them at its import."""
    done = guarded(tmp_path, "predict", model.parent, files(image_dir / "red")[0])
    assert done.returncode == TENSORFLOW_IMPORTED and "GUARD: tensorflow imported" in done.stderr


def test_the_command_line_imports_little_to_start(tmp_path):
    code = ("import sys; import retrain.cli; "
            "print(sorted(m for m in ('tensorflow', 'retrain.api', 'retrain.pipeline', 'tqdm', 'PIL') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the resize


RESIZES = [
    ((37, 53), (224, 224)),  # up
    ((500, 375), (224, 224)),  # down, aspect ratio not kept
    ((3024, 4032), (224, 224)),  # a phone photo, far down
    ((7, 3), (32, 32)),  # tiny, far up
    ((1, 1), (5, 7)),
    ((1, 640), (224, 224)),
    ((300, 400), (301, 399)),  # almost the same size
    ((224, 224), (224, 224)),  # the same size
    ((99, 1001), (13, 640)),  # up one way, down the other
    ((480, 640), (192, 160)),
]


def test_numpy_resize_matches_tf_image_resize():
    """Measured here (x86, TensorFlow 2.21): max |difference| 0.0 before rounding, 100 % of uint8
    pixels equal, on every case: the NumPy code does TensorFlow's float32 operations in its order.
    Asserted: float32 differences within a few units in the last place of 255 (an FMA-built
    TensorFlow could round differently) and uint8 equal on at least 99.99 % of pixels, never off
    by more than one level."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    report = []
    for shape, size in RESIZES:
        image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        theirs = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=False).numpy()
        ours = bilinear_float32(image, *size)
        assert ours.shape == theirs.shape == size + (3,) and ours.dtype == np.float32
        theirs8 = tf.cast(tf.clip_by_value(tf.round(theirs), 0.0, 255.0), tf.uint8).numpy()
        ours8 = resize_bilinear_numpy(image, *size)
        float_diff = float(np.abs(ours - theirs).max())
        equal = float((ours8 == theirs8).mean())
        report.append(f"{shape}->{size}: max |diff| {float_diff:.2e}, uint8 equal {100 * equal:.4f} %")
        assert float_diff <= 1e-4, report[-1]
        assert equal >= 0.9999 and np.abs(ours8.astype(int) - theirs8).max() <= 1, report[-1]
    print("\n".join(report))


# ----------------------------------------------------------------------------- real photos


@pytest.mark.realdata
def test_real_photos_get_tensorflows_pixels_without_tensorflow(real_data):
    """All 1,000 cats_and_dogs_filtered validation photos at the real module's 224x224: the pixels
    a .tflite file gets without TensorFlow are the pixels TensorFlow gives (bench part 8 runs a
    trained file on them: the same top-1 on every image)."""
    folder = real_data / "cats_and_dogs_filtered" / "validation"
    paths = files(folder)
    assert len(paths) == 1000
    decoders = [probe_image(Path(p).read_bytes()).decoder for p in paths]
    pixels = {}
    for tensorflow in (True, False):
        for indices, batch, skips in iter_image_batches(paths, decoders, 224, 224, 64, tensorflow=tensorflow):
            assert skips == []
            for index, image in zip(indices.tolist(), batch):
                pixels.setdefault(index, []).append(image)
    assert len(pixels) == 1000
    different = [paths[i] for i, (a, b) in pixels.items() if not np.array_equal(a, b)]
    assert different == []
