"""Training-time augmentation: random flip, crop/zoom, brightness and contrast.

It works on uint8 images already at the module's size (the output of the one preprocessing
path) and returns uint8 images of the same size, so what follows (``to_module_input`` and the
module) is exactly what serving runs. It is never part of the serving model.

The randomness is drawn in NumPy, one parameter set per image, and applied in one batched
TensorFlow call. That makes an augmented copy a pure function of a seed:

* for the frozen path, copy ``k`` of an image is seeded from its content hash, ``k`` and the
  augmentation settings, so its bottleneck can be cached like any other and a second run
  computes none;
* for fine-tuning, each epoch draws fresh parameters from the run's seed and the epoch number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from .._tf import tf as _tf

# Bump when the pixels produced for given parameters change: it is part of the cache key.
AUGMENTATION_VERSION = 1


@dataclass(frozen=True)
class Augmentation:
    """How strong each random change is; the defaults are the ones measured in the README."""

    flip: bool = True  # mirror left-right with probability 1/2
    min_crop: float = 0.8  # crop side as a fraction of the image side, uniform in [min_crop, 1], then resized back (zoom <= 1.25x)
    brightness: float = 0.1  # added to [0, 1] pixel values, uniform in [-brightness, brightness]
    contrast: float = 0.2  # contrast factor uniform in [1 - contrast, 1 + contrast], around each image's mean

    def key(self) -> str:
        """Short stable digest of the settings (and of the code version) for cache keys."""
        text = json.dumps({**asdict(self), "version": AUGMENTATION_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {**asdict(self), "version": AUGMENTATION_VERSION}

    def draw(self, rng: np.random.Generator, n: int) -> dict:
        """Parameters for ``n`` images: crop boxes (normalised, flipped boxes mirror), brightness, contrast."""
        side = rng.uniform(self.min_crop, 1.0, size=n)
        top = rng.uniform(0.0, 1.0, size=n) * (1.0 - side)
        left = rng.uniform(0.0, 1.0, size=n) * (1.0 - side)
        flip = rng.uniform(size=n) < 0.5 if self.flip else np.zeros(n, bool)
        x1, x2 = np.where(flip, left + side, left), np.where(flip, left, left + side)
        return {
            "boxes": np.stack([top, x1, top + side, x2], axis=1).astype(np.float32),
            "brightness": rng.uniform(-self.brightness, self.brightness, size=n).astype(np.float32),
            "contrast": rng.uniform(1.0 - self.contrast, 1.0 + self.contrast, size=n).astype(np.float32),
        }

    def draw_for_keys(self, keys) -> dict:
        """One parameter set per cache key, each seeded by its key alone (order does not matter)."""
        parts = [self.draw(np.random.default_rng(int(key[:16], 16)), 1) for key in keys]
        return {name: np.concatenate([p[name] for p in parts]) for name in ("boxes", "brightness", "contrast")}


DEFAULT_AUGMENTATION = Augmentation()


def copy_key(content_hash: str, copy: int, augmentation: Augmentation) -> str:
    """Cache key of augmented copy ``copy`` of an image: its content hash, the copy index and the settings."""
    return hashlib.sha256(f"{content_hash}|copy {copy}|{augmentation.key()}".encode()).hexdigest()


_apply = None


def augment_pixels(pixels: np.ndarray, params: dict) -> np.ndarray:
    """Apply drawn parameters to a uint8 batch ``[n, H, W, 3]``; returns uint8 ``[n, H, W, 3]``."""
    global _apply
    tf = _tf()
    if _apply is None:

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, None, 3], tf.uint8),
                tf.TensorSpec([None, 4], tf.float32),
                tf.TensorSpec([None], tf.float32),
                tf.TensorSpec([None], tf.float32),
            ],
            autograph=False,
        )
        def apply(images, boxes, brightness, contrast):
            shape = tf.shape(images)
            x = tf.cast(images, tf.float32) / 255.0
            # One op for crop, zoom back to H x W and mirror (a box with x1 > x2 is mirrored);
            # the box [0, 0, 1, 1] returns the image unchanged.
            x = tf.image.crop_and_resize(x, boxes, tf.range(shape[0]), shape[1:3], method="bilinear")
            mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
            x = (x - mean) * contrast[:, None, None, None] + mean + brightness[:, None, None, None]
            return tf.cast(tf.round(tf.clip_by_value(x * 255.0, 0.0, 255.0)), tf.uint8)

        _apply = apply
    return _apply(
        tf.constant(pixels, tf.uint8),
        tf.constant(params["boxes"]),
        tf.constant(params["brightness"]),
        tf.constant(params["contrast"]),
    ).numpy()


def augmented_cache(cache_root, module_info, augmentation: Augmentation):
    """The cache of augmented copies: beside the plain one, keyed by module, preprocessing and settings."""
    from ..features.bottlenecks import BottleneckCache

    return BottleneckCache(cache_root, module_info.fingerprint, f"{module_info.input_spec.key()}-aug{augmentation.key()}")


def extract_augmented_bottlenecks(images, module, cache, copies: int, augmentation: Augmentation = DEFAULT_AUGMENTATION,
                                  batch_size: int = 64):
    """Bottlenecks of ``copies`` augmented copies of each image (dataset.ImageFile), cached.

    Returns ``(bottlenecks, keys)``: ``keys[i]`` lists the cache keys of image ``i``'s copies,
    whose vectors are in ``bottlenecks.vectors``. Copies are for training only."""
    from dataclasses import replace

    from ..features.bottlenecks import extract_bottlenecks

    keys = [[copy_key(image.content_hash, k, augmentation) for k in range(copies)] for image in images]
    virtual = [replace(image, content_hash=key) for image, image_keys in zip(images, keys) for key in image_keys]

    def augment(pixels, batch_keys):
        return augment_pixels(pixels, augmentation.draw_for_keys(batch_keys))

    return extract_bottlenecks(virtual, module, cache, batch_size, augment=augment), keys


__all__ = ["Augmentation", "DEFAULT_AUGMENTATION", "AUGMENTATION_VERSION", "augment_pixels", "copy_key",
           "augmented_cache", "extract_augmented_bottlenecks"]
