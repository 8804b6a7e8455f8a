"""The anchor-style baseline: what TF Hub's former ``make_image_classifier`` did, on a given split.

The module is a frozen ``hub.KerasLayer`` inside a tf_keras model, so it runs again on every
image in every epoch. Everything else is that tool's defaults (``get_default_hparams`` and the
code around it): 5 epochs, batch 32, SGD with learning rate 0.005 and momentum 0.9, dropout 0.2,
a softmax ``Dense`` layer with L2 1e-4, label smoothing 0.1, ``steps_per_epoch = samples // batch``;
then a SavedModel and a float32 TFLite file, as with its ``--saved_model_dir`` and
``--tflite_output_file``. Its input was ``ImageDataGenerator(rescale=1/255).flow_from_directory``
with bilinear resizing and no augmentation: every image loaded with PIL and resized, scaled by
1/255, in an order reshuffled every epoch. ``ImageFolder`` below does exactly that (the
generator's identity transform aside, which needs SciPy, a package this project does not install).

One change, for a fair comparison: instead of its own 20 % validation split of one folder, it
reads retrain's split (``SPLIT/train``, ``SPLIT/validation``, ``SPLIT/test``, each
``<class>/<images>``), so both programs train, validate and test on the same images.

    TF_USE_LEGACY_KERAS=1 python -m bench.baseline --split DIR --module DIR --image-size 224 --output DIR

Prints one JSON document: timings per phase, history, test accuracy on every test image.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # hub.KerasLayer is a tf_keras (Keras 2) layer
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import math
import time
from pathlib import Path

STARTED = time.perf_counter()

# make_image_classifier_lib.get_default_hparams() and the constants of its model and training
EPOCHS = 5
BATCH_SIZE = 32
LEARNING_RATE = 0.005
MOMENTUM = 0.9
DROPOUT = 0.2
L2 = 0.0001
LABEL_SMOOTHING = 0.1


def _files(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted(p for p in (folder / name).iterdir() if not p.name.startswith(".")):
            files.append(str(path))
            labels.append(label)
    return files, labels


def _image_folder_class():
    import numpy as np
    import tf_keras

    class ImageFolder(tf_keras.utils.Sequence):
        """What flow_from_directory yields without augmentation: PIL load, bilinear resize, 1/255,
        one-hot labels, reshuffled every epoch."""

        def __init__(self, files, labels, classes, size, batch_size, shuffle, seed):
            super().__init__()
            self.files, self.labels = files, np.asarray(labels)
            self.classes, self.size, self.batch_size, self.shuffle = classes, size, batch_size, shuffle
            self.rng = np.random.default_rng(seed)
            self.order = np.arange(len(files))
            self.on_epoch_end()

        def __len__(self):
            return math.ceil(len(self.files) / self.batch_size)

        def __getitem__(self, number):
            chosen = self.order[number * self.batch_size : (number + 1) * self.batch_size]
            pixels = np.stack([
                tf_keras.utils.img_to_array(
                    tf_keras.utils.load_img(self.files[i], target_size=self.size, interpolation="bilinear")) / 255.0
                for i in chosen])
            return pixels, tf_keras.utils.to_categorical(self.labels[chosen], len(self.classes))

        def on_epoch_end(self):
            if self.shuffle:
                self.rng.shuffle(self.order)

    return ImageFolder


def main() -> None:
    parser = argparse.ArgumentParser(description="anchor-style baseline (make_image_classifier's behaviour)")
    parser.add_argument("--split", required=True, help="folder with train/, validation/, test/ of <class>/<images>")
    parser.add_argument("--module", required=True, help="feature-vector module (SavedModel folder)")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    timings = {}

    import numpy as np
    import tensorflow as tf
    import tensorflow_hub as hub
    import tf_keras

    tf.get_logger().setLevel("ERROR")
    tf_keras.utils.set_random_seed(args.seed)
    timings["import"] = time.perf_counter() - STARTED

    mark = time.perf_counter()
    module_layer = hub.KerasLayer(args.module, trainable=False)
    timings["module"] = time.perf_counter() - mark

    mark = time.perf_counter()
    split = Path(args.split)
    size = (args.image_size, args.image_size)
    classes = sorted(p.name for p in (split / "train").iterdir() if p.is_dir())
    image_folder = _image_folder_class()
    train_files, train_labels = _files(split / "train", classes)
    valid_files, valid_labels = _files(split / "validation", classes)
    train = image_folder(train_files, train_labels, classes, size, BATCH_SIZE, shuffle=True, seed=args.seed)
    valid = image_folder(valid_files, valid_labels, classes, size, BATCH_SIZE, shuffle=False, seed=args.seed)
    timings["data"] = time.perf_counter() - mark

    model = tf_keras.Sequential([
        tf_keras.Input(shape=size + (3,)),
        module_layer,
        tf_keras.layers.Dropout(rate=DROPOUT),
        tf_keras.layers.Dense(len(classes), activation="softmax", kernel_regularizer=tf_keras.regularizers.l2(L2)),
    ])
    model.compile(
        optimizer=tf_keras.optimizers.SGD(learning_rate=LEARNING_RATE, momentum=MOMENTUM),
        loss=tf_keras.losses.CategoricalCrossentropy(label_smoothing=LABEL_SMOOTHING),
        metrics=["accuracy"],
    )
    mark = time.perf_counter()
    history = model.fit(
        train,
        epochs=EPOCHS,
        steps_per_epoch=len(train_files) // BATCH_SIZE,
        validation_data=valid,
        validation_steps=max(1, len(valid_files) // BATCH_SIZE),
        verbose=0,
    ).history
    timings["fit"] = time.perf_counter() - mark

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    mark = time.perf_counter()
    tf.saved_model.save(model, str(output / "saved_model"))
    timings["saved_model"] = time.perf_counter() - mark
    mark = time.perf_counter()
    converter = tf.lite.TFLiteConverter.from_saved_model(str(output / "saved_model"))
    (output / "model.tflite").write_bytes(converter.convert())
    timings["tflite"] = time.perf_counter() - mark
    (output / "labels.txt").write_text("\n".join(classes) + "\n")
    timings["command"] = time.perf_counter() - STARTED

    # Test accuracy on every test file, through the baseline's own preprocessing (outside "command").
    mark = time.perf_counter()
    files, labels = _files(split / "test", classes)
    predicted, unreadable = [], 0
    for start in range(0, len(files), BATCH_SIZE):
        pixels, readable = [], []
        for path in files[start : start + BATCH_SIZE]:
            try:
                image = tf_keras.utils.load_img(str(path), target_size=size, interpolation="bilinear")
            except Exception:  # noqa: BLE001 - a file its loader cannot read counts as a wrong answer
                unreadable += 1
                readable.append(False)
                continue
            pixels.append(tf_keras.utils.img_to_array(image) / 255.0)
            readable.append(True)
        scores = iter(model.predict(np.stack(pixels), verbose=0).argmax(axis=1).tolist() if pixels else [])
        predicted.extend(next(scores) if ok else -1 for ok in readable)
    correct = sum(int(p == t) for p, t in zip(predicted, labels))
    timings["test_evaluation"] = time.perf_counter() - mark

    print(json.dumps({
        "classes": classes,
        "images": {"train": len(train_files), "validation": len(valid_files), "test": len(files)},
        "steps_per_epoch": len(train_files) // BATCH_SIZE,
        "hparams": {"epochs": EPOCHS, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "momentum": MOMENTUM,
                    "dropout": DROPOUT, "l2": L2, "label_smoothing": LABEL_SMOOTHING, "optimizer": "sgd"},
        "history": {k: [float(x) for x in v] for k, v in history.items()},
        "test_accuracy": correct / len(files) if files else None,
        "test_unreadable": unreadable,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__, "tensorflow_hub": hub.__version__},
    }))


if __name__ == "__main__":
    main()
