"""Encoded image files decoded inside a TensorFlow graph, as training decodes them.

The SavedModel's ``serving_bytes`` signature takes image files as bytes (what TF Serving and
Vertex AI send as ``image_bytes``), so decoding must be graph ops, not Pillow. This reproduces
what ``images.decode_to_size`` does for the formats a server gets (JPEG, PNG, GIF, BMP):

* JPEG: the EXIF orientation read from the bytes and applied as Pillow's
  ``ImageOps.exif_transpose`` applies it (training sends EXIF-rotated JPEGs through Pillow, so
  a photo taken sideways is seen upright by both), each kind decoded as training decodes it;
* PNG / GIF / BMP: decoded with their own channels; transparent pixels composited on white, grey
  repeated to RGB, as ``images.to_rgb`` does;
* then the same bilinear resize and rounding to uint8 (``images.resize_to_uint8``).

Not covered in the graph (the training path decodes them with Pillow): CMYK JPEGs, 16-bit PNGs
with a transparency key, palette transparency in GIFs, and the formats TensorFlow does not
decode (HEIC, AVIF, WebP, TIFF). tests/test_serving_bytes.py measures the pixels against the
training path on each covered case.
"""

from __future__ import annotations

from .._tf import tf as _tf
from .images import BACKGROUND, resize_to_uint8

EXIF_SCAN_BYTES = 1 << 16  # the APP1 segment that holds EXIF comes right after the JPEG's start
ORIENTATION_TAG = 0x0112
MAX_IFD_ENTRIES = 64


def _unsigned(data, offset, size: int, little):
    """An unsigned integer of ``size`` bytes at ``offset`` of a uint8 vector (0 beyond its end)."""
    tf = _tf()
    positions = offset + tf.range(size)
    inside = positions < tf.shape(data)[0]
    values = tf.where(inside, tf.gather(data, tf.minimum(positions, tf.shape(data)[0] - 1)), 0)
    values = tf.cast(values, tf.int64)
    weights = tf.bitwise.left_shift(tf.constant(1, tf.int64), 8 * tf.range(size, dtype=tf.int64))
    weights = tf.where(little, weights, tf.reverse(weights, [0]))
    return tf.reduce_sum(values * weights)


def exif_orientation(data):
    """The EXIF orientation (1-8) of a JPEG's bytes, 1 when it has none: graph ops only."""
    tf = _tf()
    head = tf.io.decode_raw(tf.strings.substr(data, 0, EXIF_SCAN_BYTES), tf.uint8)
    head = tf.cast(head, tf.int32)
    n = tf.shape(head)[0]
    marker = tf.constant([0x45, 0x78, 0x69, 0x66, 0, 0])  # "Exif\0\0", then the TIFF header
    windows = n - 5
    found = tf.ones([tf.maximum(windows, 0)], tf.bool)
    for i in range(6):
        found &= tf.equal(head[i: i + tf.maximum(windows, 0)], marker[i])
    hits = tf.where(found)[:, 0]

    def read():
        tiff = tf.cast(hits[0], tf.int32) + 6
        little = tf.equal(head[tf.minimum(tiff, n - 1)], 0x49)  # "II": little-endian, "MM": big
        ifd = tiff + tf.cast(_unsigned(head, tiff + 4, 4, little), tf.int32)
        count = tf.minimum(tf.cast(_unsigned(head, ifd, 2, little), tf.int32), MAX_IFD_ENTRIES)
        entries = ifd + 2 + 12 * tf.range(count)
        tags = tf.map_fn(lambda at: _unsigned(head, at, 2, little), entries, fn_output_signature=tf.int64)
        match = tf.where(tf.equal(tags, ORIENTATION_TAG))[:, 0]
        value = tf.cond(tf.size(match) > 0,
                        lambda: _unsigned(head, entries[tf.cast(match[0], tf.int32)] + 8, 2, little),
                        lambda: tf.constant(1, tf.int64))
        return tf.where((value >= 1) & (value <= 8), value, 1)

    return tf.cast(tf.cond(tf.size(hits) > 0, read, lambda: tf.constant(1, tf.int64)), tf.int32)


def orient(image, orientation):
    """Apply an EXIF orientation as Pillow's ``exif_transpose`` does."""
    tf = _tf()
    transpose = lambda: tf.transpose(image, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,  # 1 (and anything unknown)
        lambda: tf.reverse(image, [1]),  # 2: mirrored left-right
        lambda: tf.image.rot90(image, 2),  # 3: upside down
        lambda: tf.reverse(image, [0]),  # 4: mirrored top-bottom
        transpose,  # 5
        lambda: tf.image.rot90(image, 3),  # 6: taken with the phone turned right
        lambda: tf.image.rot90(transpose(), 2),  # 7: transverse
        lambda: tf.image.rot90(image, 1),  # 8: taken with the phone turned left
    ]
    return tf.switch_case(orientation - 1, branches)


def _on_white(image):
    """Grey, grey + alpha, RGB or RGBA uint8 -> RGB uint8, transparency composited on white."""
    tf = _tf()
    channels = tf.shape(image)[-1]

    def composite():
        colour, alpha = image[..., :-1], tf.cast(image[..., -1:], tf.int32)
        colour = tf.cast(colour, tf.int32)
        mixed = (colour * alpha + BACKGROUND[0] * (255 - alpha) + 127) // 255
        return tf.cast(mixed, tf.uint8)

    without_alpha = tf.cond(tf.equal(channels % 2, 0), composite, lambda: image)
    return tf.cond(tf.equal(tf.shape(without_alpha)[-1], 1), lambda: tf.image.grayscale_to_rgb(without_alpha),
                   lambda: without_alpha[..., :3])


def decode_encoded(data, height: int, width: int):
    """One encoded file (scalar string) -> uint8 [height, width, 3], as training decodes it."""
    tf = _tf()
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 2), b"\xff\xd8")

    def jpeg():
        # As training: an upright JPEG through TensorFlow's decoder (its default DCT), a rotated
        # one through Pillow's, whose output the accurate integer DCT reproduces exactly
        # (TensorFlow's default differs from it by up to 7 levels on noisy pixels).
        orientation = exif_orientation(data)
        return tf.cond(tf.equal(orientation, 1), lambda: tf.io.decode_jpeg(data, channels=3),
                       lambda: orient(tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"), orientation))

    def other():
        return _on_white(tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False))

    image = tf.cond(is_jpeg, jpeg, other)
    image.set_shape([None, None, 3])
    return resize_to_uint8(image, height, width)


def decode_encoded_batch(batch, height: int, width: int):
    """[n] encoded files -> uint8 [n, height, width, 3]."""
    tf = _tf()
    return tf.map_fn(lambda data: decode_encoded(data, height, width), batch,
                     fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8))
