"""Tiny feature-vector modules, saved as TF Hub style SavedModels in a few seconds.

A module is a ``tf.Module`` whose ``__call__(images, training=False)`` is traced for both
``training`` values, like tfhub.dev's TF2 feature_vector modules, and which lists its
``variables``, ``trainable_variables`` and ``regularization_losses`` (the reusable SavedModel
convention). Features are the mean colour plus a few ReLU'd 1x1-convolution channels, so
solid-colour classes separate.
"""

from __future__ import annotations

import numpy as np


def save_tiny_module(path, size=32, dim=8, variable_size=False, output="vector", seed=0, trainable=True,
                     batch_norm=False, work=0):
    """Write a tiny module to ``path``; ``output``: "vector", "logits" (1001 values), "map" (rank 4).

    ``work`` > 0 adds that many 384x384 matrix products per call (results unchanged), so a
    crash test can stop a run in the middle of its extraction.

    ``trainable=False`` bakes the weights in as constants (nothing to fine-tune);
    ``batch_norm=True`` adds batch normalization after the convolution, with moving statistics
    that only a ``training=True`` call updates."""
    import tensorflow as tf

    height = width = None if variable_size else size
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(1, 1, 3, dim - 3)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=(dim - 3,)).astype(np.float32)
    logits = rng.normal(size=(dim, 1001)).astype(np.float32) if output == "logits" else None

    class Tiny(tf.Module):
        # Plain attributes instead of tf.Module's properties, so the SavedModel lists them.
        variables = None
        trainable_variables = None
        regularization_losses = None

        def __init__(self):
            super().__init__()
            weight = tf.Variable if trainable else tf.constant
            self.kernel, self.bias = weight(kernel, name="conv/kernel"), weight(bias, name="conv/bias")
            self.logits = weight(logits, name="logits") if logits is not None else None
            self.busy = tf.constant(np.eye(384, dtype=np.float32) * 0.5) if work else None
            trained = [self.kernel, self.bias] + ([self.logits] if logits is not None else [])
            statistics = []
            if batch_norm:
                channels = dim - 3
                self.gamma = tf.Variable(np.ones(channels, np.float32), name="bn/gamma")
                self.beta = tf.Variable(np.zeros(channels, np.float32), name="bn/beta")
                self.moving_mean = tf.Variable(rng.normal(scale=0.1, size=channels).astype(np.float32),
                                               trainable=False, name="bn/moving_mean")
                self.moving_variance = tf.Variable(1 + np.abs(rng.normal(scale=0.1, size=channels)).astype(np.float32),
                                                   trainable=False, name="bn/moving_variance")
                trained += [self.gamma, self.beta]
                statistics = [self.moving_mean, self.moving_variance]
            self.trainable_variables = trained if trainable else []
            self.variables = trained + statistics if trainable else []
            self.regularization_losses = []

        def _normalize(self, mapped, training):
            if not batch_norm:
                return mapped
            if training:
                mean, variance = tf.nn.moments(mapped, axes=[0, 1, 2])
                self.moving_mean.assign(0.9 * self.moving_mean + 0.1 * mean)
                self.moving_variance.assign(0.9 * self.moving_variance + 0.1 * variance)
            else:
                mean, variance = self.moving_mean, self.moving_variance
            return tf.nn.batch_normalization(mapped, mean, variance, self.beta, self.gamma, 1e-3)

        @tf.function
        def __call__(self, images, training=False):
            mapped = tf.nn.relu(self._normalize(tf.nn.conv2d(images, self.kernel, 1, "VALID") + self.bias, training))
            if output == "map":
                return mapped
            features = tf.concat([tf.reduce_mean(images, [1, 2]), tf.reduce_mean(mapped, [1, 2])], axis=1)
            if work:
                product = self.busy
                for _ in range(work):
                    product = tf.matmul(product, self.busy)
                features += 0.0 * tf.reduce_min(tf.abs(product))  # depends on the work, changes nothing
            if output == "logits":
                return tf.matmul(features, self.logits)
            return features

    return _save_traced(Tiny(), path, height, width)


def _save_traced(module, path, height, width):
    """Trace ``__call__`` for both ``training`` values (the reusable SavedModel convention) and save."""
    import tensorflow as tf

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


def save_pooling_module(path, size=32):
    """The old TF Hub tool's test module: GlobalAveragePooling2D alone (3 features: the mean colour)."""
    import tensorflow as tf

    class Pooling(tf.Module):
        variables = []
        trainable_variables = []
        regularization_losses = []

        @tf.function
        def __call__(self, images, training=False):
            return tf.reduce_mean(images, axis=[1, 2])

    return _save_traced(Pooling(), path, size, size)


def write_one_pixel_colour_images(root, per_class=10, size=(24, 20), seed=0):
    """Solid red, green and blue images, each with one pixel of another colour (the old tool's test data)."""
    from pathlib import Path

    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for name, colour in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = np.zeros((size[1], size[0], 3), np.uint8) + np.asarray(colour, np.uint8)
            pixels[rng.integers(size[1]), rng.integers(size[0])] = rng.integers(0, 256, 3)
            Image.fromarray(pixels).save(root / name / f"{name}_{index}.png")
    return root


def colour_pixels(classes, per_class=8, size=32, seed=11):
    """uint8 [n, size, size, 3] solid colours with noise, ``per_class`` of each of ``classes`` (COLOURS names)."""
    rng = np.random.default_rng(seed)
    images = [np.clip(np.asarray(COLOURS[name], np.float32) + rng.normal(scale=12, size=(size, size, 3)), 0, 255)
              for name in classes for _ in range(per_class)]
    return np.stack(images).astype(np.uint8)
