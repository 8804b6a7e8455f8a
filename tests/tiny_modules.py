"""Tiny feature-vector modules, saved as TF Hub style SavedModels in a few seconds.

A module is a ``tf.Module`` whose ``__call__(images, training=False)`` is traced for both
``training`` values, like tfhub.dev's TF2 feature_vector modules. Features are the mean colour
plus a few ReLU'd 1x1-convolution channels (Keras layers), so solid-colour classes separate.
"""

from __future__ import annotations

import numpy as np


def save_tiny_module(path, size=32, dim=8, variable_size=False, output="vector", seed=0, work=0):
    """Write a tiny module to ``path``; ``output``: "vector", "logits" (1001 values), "map" (rank 4).

    ``work`` > 0 adds that many 384x384 matrix products per call (results unchanged), so a
    crash test can stop a run in the middle of its extraction.
    """
    import keras
    import tensorflow as tf

    height = width = None if variable_size else size
    rng = np.random.default_rng(seed)

    class Tiny(tf.Module):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(dim - 3, 1, activation="relu", name="conv")
            self.conv.build((None, None, None, 3))
            self.conv.kernel.assign(rng.normal(size=(1, 1, 3, dim - 3)).astype(np.float32))
            self.conv.bias.assign(rng.normal(scale=0.1, size=(dim - 3,)).astype(np.float32))
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.logits = tf.Variable(rng.normal(size=(dim, 1001)).astype(np.float32)) if output == "logits" else None
            self.busy = tf.Variable(np.eye(384, dtype=np.float32) * 0.5) if work else None

        @tf.function
        def __call__(self, images, training=False):
            mapped = self.conv(images)
            if output == "map":
                return mapped
            features = tf.concat([self.pool(images), self.pool(mapped)], axis=1)
            if work:
                product = self.busy
                for _ in range(work):
                    product = tf.matmul(product, self.busy)
                features += 0.0 * tf.reduce_min(tf.abs(product))  # depends on the work, changes nothing
            if output == "logits":
                return tf.matmul(features, self.logits)
            return features

    module = Tiny()
    spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="images")
    module.__call__.get_concrete_function(spec, training=False)
    module.__call__.get_concrete_function(spec, training=True)
    tf.saved_model.save(module, str(path))
    return str(path)


COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def write_colour_images(root, counts=None, size=(24, 20), seed=0, fmt="JPEG"):
    """Solid-colour images with noise (so no two files are identical) under root/<colour>/."""
    from pathlib import Path

    from PIL import Image

    rng = np.random.default_rng(seed)
    counts = counts or {name: 10 for name in COLOURS}
    root = Path(root)
    for name, count in counts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.asarray(COLOURS[name], np.float32)
        for index in range(count):
            pixels = np.clip(base + rng.normal(scale=12, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
            suffix = ".jpg" if fmt == "JPEG" else ".png"
            Image.fromarray(pixels).save(folder / f"{name}_{seed}_{index}{suffix}", fmt)
    return root
