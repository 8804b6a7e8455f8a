"""An independent reader of the TFLite metadata: MediaPipe Tasks' ImageClassifier (the Python twin
of the Android / iOS on-device API) reports our label names for the float32 and the int8 file.
MediaPipe is in the test extra; it shows category names only when the file carries proper TFLite
metadata with a TENSOR_AXIS_LABELS file on the output tensor."""

import numpy as np
import pytest

import retrain


@pytest.fixture(scope="module")
def model(tiny_module, colour_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mediapipe") / "out"
    retrain.train(colour_dir, tiny_module, out, cache_dir=str(tmp_path_factory.mktemp("c")), quantize=("int8",))
    return out


@pytest.mark.parametrize("file", ["model.tflite", "model_int8.tflite"])
def test_mediapipe_image_classifier_names_our_classes(model, file):
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model / file)),
                                            max_results=3)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for colour, rgb in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}.items():
            pixels = np.zeros((32, 32, 3), np.uint8) + np.asarray(rgb, np.uint8)
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels))
            categories = result.classifications[0].categories
            assert {c.category_name for c in categories} == {"blue", "green", "red"}
            assert categories[0].category_name == colour
