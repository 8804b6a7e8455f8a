"""``serving_bytes``: encoded files in, decoded inside the graph exactly as training decodes them."""

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from retrain.cli import main
from retrain.data.encoded import decode_encoded
from retrain.data.images import decode_to_size, load_image
from retrain.evaluation.runner import SavedModelRunner


def _encoded_cases() -> dict[str, bytes]:
    """JPEGs with every EXIF orientation, PNGs (RGB, RGBA, grey, grey + alpha, palette), GIF, BMP."""
    rng = np.random.default_rng(0)
    base = (rng.random((37, 53, 3)) * 255).astype(np.uint8)
    base[:10, :20] = [255, 0, 0]  # a corner mark: every orientation moves it somewhere else
    cases = {}
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(base).save(buffer, "JPEG", exif=exif.tobytes(), quality=92)
        cases[f"jpeg-orientation-{orientation}"] = buffer.getvalue()
    alpha = (rng.random((37, 53, 1)) * 255).astype(np.uint8)
    rgba = np.concatenate([base, alpha], axis=2)
    images = {"png-rgb": (Image.fromarray(base), "PNG"), "png-rgba": (Image.fromarray(rgba, "RGBA"), "PNG"),
              "png-grey": (Image.fromarray(base[..., 0]), "PNG"), "png-grey-alpha": (Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"),
              "png-palette": (Image.fromarray(base).convert("P"), "PNG"), "gif": (Image.fromarray(base).convert("P"), "GIF"),
              "bmp": (Image.fromarray(base), "BMP")}
    for name, (image, fmt) in images.items():
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        cases[name] = buffer.getvalue()
    return cases


def test_graph_decoding_gives_the_training_pixels_for_every_covered_case():
    import tensorflow as tf

    decode = tf.function(lambda data: decode_encoded(data, 24, 20))
    upright = decode_to_size(_encoded_cases()["jpeg-orientation-1"], 24, 20)
    for name, data in _encoded_cases().items():
        graph = decode(tf.constant(data)).numpy()
        training = decode_to_size(data, 24, 20)
        assert np.array_equal(graph, training), f"{name}: max difference {np.abs(graph.astype(int) - training).max()}"
        if name.startswith("jpeg-orientation-") and not name.endswith("-1"):
            assert not np.array_equal(graph, upright), f"{name}: the orientation was not applied"


@pytest.fixture(scope="module")
def trained(tiny_module, colour_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bytes") / "out"
    result = CliRunner().invoke(main, ["train", str(colour_dir), "--module", tiny_module, "--output", str(out),
                                       "--epochs", "30", "--quantize", "none", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_serving_bytes_gives_the_probabilities_evaluate_gives(trained, colour_dir, tmp_path):
    import tensorflow as tf

    files = sorted(p for p in colour_dir.rglob("*") if p.is_file())[:9]
    # The same images as other formats, and an EXIF-rotated JPEG
    extra = []
    for index, path in enumerate(files[:3]):
        image = Image.open(path).convert("RGB")
        for fmt in ("GIF", "BMP"):
            target = tmp_path / f"{index}.{fmt.lower()}"
            image.save(target, fmt)
            extra.append(target)
        exif = Image.Exif()
        exif[0x0112] = 6
        rotated = tmp_path / f"{index}-rotated.jpg"
        image.save(rotated, "JPEG", exif=exif.tobytes())
        extra.append(rotated)
    files += extra

    model = tf.saved_model.load(str(trained / "saved_model"))
    served = model.signatures["serving_bytes"](image_bytes=tf.constant([p.read_bytes() for p in files]))
    runner = SavedModelRunner(trained / "saved_model")
    expected = runner.predict(np.stack([load_image(str(p), runner.height, runner.width) for p in files]))
    assert np.abs(served["probabilities"].numpy() - expected).max() < 1e-6
    labels = (trained / "labels.txt").read_text().split()
    names = [[c.decode() for c in row] for row in served["classes"].numpy()]
    assert [row[0] for row in names] == [labels[i] for i in expected.argmax(axis=1)]
    assert all(len(row) == len(labels) for row in names)  # 3 classes: all of them, best first
    scores = served["scores"].numpy()
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert np.allclose(scores[:, 0], expected.max(axis=1), atol=1e-6)


def test_the_signature_is_listed_in_the_files_and_the_card(trained):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((trained / "saved_model" / "saved_model.pb").read_bytes())
    signature = proto.meta_graphs[0].signature_def["serving_bytes"]
    assert list(signature.inputs) == ["image_bytes"] and signature.inputs["image_bytes"].dtype == 7  # DT_STRING
    assert set(signature.outputs) == {"probabilities", "classes", "scores"}
    card = (trained / "README.md").read_text()
    assert '"signature_name\\": \\"serving_bytes\\"' in card and "image_bytes" in card
    run = json.loads((trained / "run.json").read_text())
    assert run["tool"] == "retrain"
